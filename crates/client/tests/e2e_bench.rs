//! Cost of sealing and opening, and media encryption throughput. Run in release:
//! `cargo test --release -p bluetick-client --test e2e_bench -- --ignored --nocapture`.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::Instant;

use bluetick_client::DeviceAddress;
use bluetick_client::e2e::media::{MEDIA_CHUNK_BYTES, MediaDecryptor, MediaEncryptor};
use bluetick_client::e2e::{E2eDevice, KeyStoreRef, MediaKey, MemoryKeyStore};
use bluetick_client::proto::gateway::v1::PreKeyBundle;

fn device(user: &str) -> E2eDevice {
    E2eDevice::load_or_create(
        DeviceAddress::new(user, 1),
        Arc::new(MemoryKeyStore::new()) as KeyStoreRef,
    )
    .unwrap()
}

fn median_micros(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[samples.len() / 2]
}

/// Prints the median µs to seal and to open a 100-byte text, per envelope kind.
#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn seal_and_open_cost() {
    let alice = device("alice");
    let bob = device("bob");
    let published = bob.prekeys_to_publish(1, true).unwrap();
    let bundle = PreKeyBundle {
        device_id: 1,
        identity_key: published.identity_key.clone(),
        signing_key: published.signing_key.clone(),
        signed_prekey: published.signed_prekey.clone(),
        one_time_prekey: published.one_time_prekeys.first().cloned(),
    };
    alice.start_session("bob", &bundle).unwrap();
    let plaintext = br#"{"text":"a typical chat message of about a hundred bytes, give or take a few words here"}"#;
    let bob_address = bob.address().clone();
    let alice_address = alice.address().clone();
    // Establish the ratchet both ways first.
    let first = alice.seal(&bob_address, "0", plaintext).unwrap();
    bob.open(&alice_address, &first).unwrap();
    let reply = bob.seal(&alice_address, "r", plaintext).unwrap();
    alice.open(&bob_address, &reply).unwrap();

    let rounds = 2000;
    let (mut seal_times, mut open_times) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let id = format!("{i:032x}");
        let started = Instant::now();
        let sealed = alice.seal(&bob_address, &id, plaintext).unwrap();
        seal_times.push(started.elapsed().as_secs_f64() * 1e6);
        let started = Instant::now();
        bob.open(&alice_address, &sealed).unwrap();
        open_times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    println!(
        "ratchet: seal {:.1} µs, open {:.1} µs (median of {rounds}, {} byte payload, in-memory key store)",
        median_micros(seal_times),
        median_micros(open_times),
        plaintext.len()
    );
    let bob_identity = bob.identity_public();
    let (mut seal_times, mut open_times) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let id = format!("{i:032x}");
        let started = Instant::now();
        let sealed = alice
            .seal_baseline(&bob_address, &bob_identity, &id, plaintext)
            .unwrap();
        seal_times.push(started.elapsed().as_secs_f64() * 1e6);
        let started = Instant::now();
        bob.open(&alice_address, &sealed).unwrap();
        open_times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    println!(
        "baseline: seal {:.1} µs, open {:.1} µs (median of {rounds})",
        median_micros(seal_times),
        median_micros(open_times)
    );
}

/// Prints media encryption and decryption throughput in MiB/s (256 MiB in 64 KiB chunks).
#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn media_throughput() {
    let key = MediaKey::generate().unwrap();
    let chunk = vec![0x5au8; MEDIA_CHUNK_BYTES];
    let chunks = 4096;
    let mut encryptor = MediaEncryptor::new(&key).unwrap();
    let mut sealed_chunks = Vec::with_capacity(8);
    let started = Instant::now();
    for i in 0..chunks {
        let sealed = encryptor.seal_chunk(&chunk, i == chunks - 1).unwrap();
        if i < 8 {
            sealed_chunks.push(sealed);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let mib = (chunks * MEDIA_CHUNK_BYTES) as f64 / (1024.0 * 1024.0);
    println!(
        "media encryption: {:.0} MiB/s ({mib:.0} MiB)",
        mib / seconds
    );
    let mut decryptor = MediaDecryptor::new(&key, &encryptor.header()).unwrap();
    let mut encryptor = MediaEncryptor::new(&key).unwrap();
    let mut all = Vec::with_capacity(chunks);
    for i in 0..chunks {
        all.push(encryptor.seal_chunk(&chunk, i == chunks - 1).unwrap());
    }
    decryptor = MediaDecryptor::new(&key, &encryptor.header()).unwrap_or(decryptor);
    let started = Instant::now();
    for (i, sealed) in all.iter().enumerate() {
        decryptor.open_chunk(sealed, i == chunks - 1).unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("media decryption: {:.0} MiB/s", mib / seconds);
}
