//! The compact binary layout of embedded keys and values.
//!
//! Integers are big-endian so that byte order is numeric order, and strings and byte
//! strings carry a `u32` length prefix so that one key component can never be a prefix
//! of another. A device key ([`device_key`]) is `len(user) user device_id`; per-device
//! rows append a big-endian `u64` to it, so a range over one device's prefix walks its
//! rows in id order.

use bluetick_proto::common::v1::DeviceAddress;

use crate::{StoreError, StoreResult};

/// Appends fields to a byte buffer.
#[derive(Debug, Default)]
pub(crate) struct Encoder {
    buffer: Vec<u8>,
}

impl Encoder {
    /// Returns an empty encoder.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn u8(mut self, value: u8) -> Self {
        self.buffer.push(value);
        self
    }

    pub(crate) fn u32(mut self, value: u32) -> Self {
        self.buffer.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub(crate) fn u64(mut self, value: u64) -> Self {
        self.buffer.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// Appends a length-prefixed byte string.
    pub(crate) fn bytes(mut self, value: &[u8]) -> Self {
        // Lengths beyond u32 cannot reach here: redb refuses values over 3 GiB first.
        let length = u32::try_from(value.len()).unwrap_or(u32::MAX);
        self.buffer.extend_from_slice(&length.to_be_bytes());
        self.buffer.extend_from_slice(value);
        self
    }

    pub(crate) fn str(self, value: &str) -> Self {
        self.bytes(value.as_bytes())
    }

    /// Appends bytes as they are, without a length (only as the last field).
    pub(crate) fn raw(mut self, value: &[u8]) -> Self {
        self.buffer.extend_from_slice(value);
        self
    }

    pub(crate) fn device(self, device: &DeviceAddress) -> Self {
        self.str(&device.user_id).u32(device.device_id)
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.buffer
    }
}

/// Reads fields back from a byte buffer; every read fails with
/// [`StoreError::Internal`] on truncated input.
#[derive(Debug)]
pub(crate) struct Decoder<'a> {
    remaining: &'a [u8],
}

impl<'a> Decoder<'a> {
    pub(crate) fn new(buffer: &'a [u8]) -> Self {
        Self { remaining: buffer }
    }

    fn take(&mut self, length: usize) -> StoreResult<&'a [u8]> {
        if self.remaining.len() < length {
            return Err(StoreError::Internal(format!(
                "stored record is truncated: wanted {length} bytes, {} left",
                self.remaining.len()
            )));
        }
        let (head, tail) = self.remaining.split_at(length);
        self.remaining = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> StoreResult<[u8; N]> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    pub(crate) fn u8(&mut self) -> StoreResult<u8> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u32(&mut self) -> StoreResult<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> StoreResult<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn bytes(&mut self) -> StoreResult<&'a [u8]> {
        let length = self.u32()? as usize;
        self.take(length)
    }

    pub(crate) fn string(&mut self) -> StoreResult<String> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| StoreError::Internal("stored string is not utf-8".to_string()))
    }

    pub(crate) fn device(&mut self) -> StoreResult<DeviceAddress> {
        let user_id = self.string()?;
        let device_id = self.u32()?;
        Ok(DeviceAddress::new(user_id, device_id))
    }

    /// Returns everything not read yet.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.remaining)
    }
}

/// Returns the key prefix of one device's rows.
pub(crate) fn device_key(device: &DeviceAddress) -> Vec<u8> {
    Encoder::new().device(device).finish()
}

/// Returns the key of row `id` of `device`.
pub(crate) fn device_row_key(device: &DeviceAddress, id: u64) -> Vec<u8> {
    Encoder::new().device(device).u64(id).finish()
}

/// Returns the inclusive key bounds of `device`'s rows with ids in `first..=last`.
pub(crate) fn device_row_range(
    device: &DeviceAddress,
    first: u64,
    last: u64,
) -> (Vec<u8>, Vec<u8>) {
    (device_row_key(device, first), device_row_key(device, last))
}

/// Returns the id at the end of a per-device row key.
pub(crate) fn row_id(key: &[u8]) -> StoreResult<u64> {
    let start = key
        .len()
        .checked_sub(8)
        .ok_or_else(|| StoreError::Internal("stored row key is too short".to_string()))?;
    Decoder::new(&key[start..]).u64()
}

/// Returns the key of an expiry index entry: `expires_at_ms` then the indexed key.
pub(crate) fn expiry_key(expires_at_ms: u64, indexed_key: &[u8]) -> Vec<u8> {
    Encoder::new().u64(expires_at_ms).raw(indexed_key).finish()
}

/// Returns the exclusive upper bound of the expiry index entries expired at `now_ms`.
pub(crate) fn expiry_bound(now_ms: u64) -> Vec<u8> {
    match now_ms.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        // Everything expires at the end of time: one byte past every 8-byte prefix.
        None => vec![0xff; 9],
    }
}

/// Splits an expiry index key back into its time and the indexed key.
pub(crate) fn split_expiry_key(key: &[u8]) -> StoreResult<(u64, &[u8])> {
    let mut decoder = Decoder::new(key);
    let expires_at_ms = decoder.u64()?;
    Ok((expires_at_ms, decoder.rest()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_fields() {
        let device = DeviceAddress::new("alice", 7);
        let encoded = Encoder::new()
            .u8(3)
            .u32(9)
            .u64(u64::MAX - 1)
            .bytes(b"\0\xffpayload")
            .device(&device)
            .raw(b"tail")
            .finish();
        let mut decoder = Decoder::new(&encoded);
        assert_eq!(decoder.u8().unwrap(), 3);
        assert_eq!(decoder.u32().unwrap(), 9);
        assert_eq!(decoder.u64().unwrap(), u64::MAX - 1);
        assert_eq!(decoder.bytes().unwrap(), b"\0\xffpayload");
        assert_eq!(decoder.device().unwrap(), device);
        assert_eq!(decoder.rest(), b"tail");
        assert!(decoder.u8().is_err());
    }

    #[test]
    fn row_keys_sort_by_id_within_a_device() {
        let device = DeviceAddress::new("bob", 1);
        assert!(device_row_key(&device, 2) < device_row_key(&device, 10));
        assert!(device_row_key(&device, 255) < device_row_key(&device, 256));
        assert_eq!(row_id(&device_row_key(&device, 42)).unwrap(), 42);
        // "bo" device 1 must not be a prefix of "bob" device 1 rows.
        let shorter = DeviceAddress::new("bo", 1);
        assert!(!device_row_key(&device, 1).starts_with(&device_key(&shorter)));
    }

    #[test]
    fn expiry_bound_includes_now() {
        let key = expiry_key(100, b"k");
        assert!(key.as_slice() < expiry_bound(100).as_slice());
        assert!(key.as_slice() >= expiry_bound(99).as_slice());
        assert!(expiry_key(u64::MAX, b"k").as_slice() < expiry_bound(u64::MAX).as_slice());
        assert_eq!(split_expiry_key(&key).unwrap(), (100, &b"k"[..]));
    }
}
