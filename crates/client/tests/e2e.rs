//! End-to-end encryption on its own (no servers): devices exchange sealed payloads directly.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bluetick_client::DeviceAddress;
use bluetick_client::e2e::{
    E2eDevice, E2eError, EnvelopeKind, IdentityCheck, KeyStoreRef, MAX_SKIP, MemoryKeyStore,
};
use bluetick_client::proto::gateway::v1::{PreKey, PreKeyBundle, PublishKeysRequest};

struct Peer {
    device: E2eDevice,
    store: Arc<MemoryKeyStore>,
    published: PublishKeysRequest,
}

fn peer(user: &str, device_id: u32, one_time: u32) -> Peer {
    let store = MemoryKeyStore::shared();
    let device = E2eDevice::load_or_create(
        DeviceAddress::new(user.to_string(), device_id),
        Arc::clone(&store) as KeyStoreRef,
    )
    .unwrap();
    let published = device.prekeys_to_publish(one_time, true).unwrap();
    Peer {
        device,
        store,
        published,
    }
}

impl Peer {
    fn address(&self) -> DeviceAddress {
        self.device.address().clone()
    }

    /// Returns a bundle as the directory hands it out, claiming the next one-time prekey.
    fn bundle(&mut self) -> PreKeyBundle {
        let one_time_prekey: Option<PreKey> = if self.published.one_time_prekeys.is_empty() {
            None
        } else {
            Some(self.published.one_time_prekeys.remove(0))
        };
        PreKeyBundle {
            device_id: self.address().device_id,
            identity_key: self.published.identity_key.clone(),
            signing_key: self.published.signing_key.clone(),
            signed_prekey: self.published.signed_prekey.clone(),
            one_time_prekey,
        }
    }
}

fn identity_of(peer: &Peer) -> [u8; 32] {
    peer.device.identity_public()
}

/// A message sealed for B opens for B only, and not at all once any byte (version, kind,
/// client_msg_id, keys, counters, nonce, ciphertext, tag) changed or the claimed sender or
/// recipient differs (both are associated data) — for baseline, prekey and ratchet envelopes.
#[test]
fn sealed_messages_open_only_for_their_recipient_and_only_unaltered() {
    let alice = peer("alice", 1, 5);
    let mut bob = peer("bob", 1, 5);
    let carol = peer("carol", 1, 5);
    let bob_address = bob.address();

    let baseline = alice
        .device
        .seal_baseline(
            &bob_address,
            &identity_of(&bob),
            "m-base",
            b"baseline secret",
        )
        .unwrap();
    alice.device.start_session("bob", &bob.bundle()).unwrap();
    let prekey = alice
        .device
        .seal(&bob_address, "m-pre", b"prekey secret")
        .unwrap();
    let mut payloads = vec![
        (EnvelopeKind::Baseline, baseline),
        (EnvelopeKind::PreKey, prekey),
    ];

    for (kind, payload) in &payloads {
        assert!(
            carol.device.open(&alice.address(), payload).is_err(),
            "{kind:?} opened for carol"
        );
        let wrong_sender = DeviceAddress::new("mallory", 1);
        assert!(bob.device.open(&wrong_sender, payload).is_err());
        let other_device = DeviceAddress::new("alice", 2);
        assert!(bob.device.open(&other_device, payload).is_err());
        for index in 0..payload.len() {
            for bit in [0x01u8, 0x80] {
                let mut bent = payload.clone();
                bent[index] ^= bit;
                assert!(
                    bob.device.open(&alice.address(), &bent).is_err(),
                    "{kind:?} opened with byte {index} changed"
                );
            }
        }
        let mut extended = payload.clone();
        extended.push(0);
        assert!(bob.device.open(&alice.address(), &extended).is_err());
        assert!(
            bob.device
                .open(&alice.address(), &payload[..payload.len() - 1])
                .is_err()
        );
    }
    let opened = bob.device.open(&alice.address(), &payloads[0].1).unwrap();
    assert_eq!(opened.kind, EnvelopeKind::Baseline);
    assert_eq!(opened.client_msg_id, "m-base");
    assert_eq!(&opened.plaintext[..], b"baseline secret");
    assert_eq!(opened.sender_identity, identity_of(&alice));
    let opened = bob.device.open(&alice.address(), &payloads[1].1).unwrap();
    assert_eq!(opened.kind, EnvelopeKind::PreKey);
    assert_eq!(&opened.plaintext[..], b"prekey secret");

    // Bob answers: a ratchet envelope, checked the same way on Alice's side.
    let reply = bob
        .device
        .seal(&alice.address(), "m-reply", b"ratchet secret")
        .unwrap();
    payloads.clear();
    assert!(carol.device.open(&bob_address, &reply).is_err());
    for index in 0..reply.len() {
        let mut bent = reply.clone();
        bent[index] ^= 0x04;
        assert!(
            alice.device.open(&bob_address, &bent).is_err(),
            "ratchet byte {index}"
        );
    }
    let opened = alice.device.open(&bob_address, &reply).unwrap();
    assert_eq!(opened.kind, EnvelopeKind::Ratchet);
    assert_eq!(&opened.plaintext[..], b"ratchet secret");
    // Once Bob answered, Alice's messages are ratchet envelopes.
    let next = alice.device.seal(&bob_address, "m-next", b"x").unwrap();
    assert_eq!(
        bob.device.open(&alice.address(), &next).unwrap().kind,
        EnvelopeKind::Ratchet
    );
}

/// Forward secrecy: after an exchange, the complete current state of both devices (every
/// record of their key stores, identity keys included) opens none of the earlier messages.
#[test]
fn captured_state_cannot_open_earlier_messages() {
    let alice = peer("alice", 1, 5);
    let mut bob = peer("bob", 1, 5);
    alice.device.start_session("bob", &bob.bundle()).unwrap();
    let mut to_bob = Vec::new();
    let mut to_alice = Vec::new();
    for round in 0..5 {
        for i in 0..3 {
            let text = format!("a{round}-{i}");
            let sealed = alice
                .device
                .seal(&bob.address(), &text, text.as_bytes())
                .unwrap();
            bob.device.open(&alice.address(), &sealed).unwrap();
            to_bob.push(sealed);
        }
        let text = format!("b{round}");
        let sealed = bob
            .device
            .seal(&alice.address(), &text, text.as_bytes())
            .unwrap();
        alice.device.open(&bob.address(), &sealed).unwrap();
        to_alice.push(sealed);
    }
    // An attacker takes everything both devices hold now.
    let stolen_bob =
        E2eDevice::load_or_create(bob.address(), Arc::new(bob.store.snapshot()) as KeyStoreRef)
            .unwrap();
    let stolen_alice = E2eDevice::load_or_create(
        alice.address(),
        Arc::new(alice.store.snapshot()) as KeyStoreRef,
    )
    .unwrap();
    for sealed in &to_bob {
        assert!(stolen_bob.open(&alice.address(), sealed).is_err());
    }
    for sealed in &to_alice {
        assert!(stolen_alice.open(&bob.address(), sealed).is_err());
    }
    // The stolen state is complete: it still works for new messages.
    let fresh = alice.device.seal(&bob.address(), "new", b"after").unwrap();
    assert_eq!(
        &stolen_bob.open(&alice.address(), &fresh).unwrap().plaintext[..],
        b"after"
    );
}

/// Messages delivered shuffled all open; each opens once (a replay is refused); a gap larger
/// than the skip bound is refused cleanly and the session keeps working.
#[test]
fn out_of_order_messages_open_replays_and_huge_gaps_are_refused() {
    let alice = peer("alice", 1, 5);
    let mut bob = peer("bob", 1, 5);
    alice.device.start_session("bob", &bob.bundle()).unwrap();
    let first = alice.device.seal(&bob.address(), "0", b"0").unwrap();
    bob.device.open(&alice.address(), &first).unwrap();
    let reply = bob.device.seal(&alice.address(), "r", b"r").unwrap();
    alice.device.open(&bob.address(), &reply).unwrap();

    let mut sealed: Vec<(usize, Vec<u8>)> = (0..200)
        .map(|i| {
            let text = format!("message {i}");
            (
                i,
                alice
                    .device
                    .seal(&bob.address(), &text, text.as_bytes())
                    .unwrap(),
            )
        })
        .collect();
    // A deterministic shuffle (Fisher-Yates with a fixed LCG).
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    for i in (1..sealed.len()).rev() {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        sealed.swap(i, (state >> 33) as usize % (i + 1));
    }
    for (i, payload) in &sealed {
        let opened = bob.device.open(&alice.address(), payload).unwrap();
        assert_eq!(
            opened.plaintext.to_vec(),
            format!("message {i}").into_bytes()
        );
    }
    for (_, payload) in sealed.iter().take(20) {
        assert!(matches!(
            bob.device.open(&alice.address(), payload),
            Err(E2eError::Replay | E2eError::Decrypt)
        ));
    }
    let newest = sealed.iter().max_by_key(|(i, _)| *i).unwrap();
    assert!(matches!(
        bob.device.open(&alice.address(), &newest.1),
        Err(E2eError::Replay)
    ));

    // Skip more than the bound.
    let mut burst = Vec::new();
    for i in 0..=MAX_SKIP + 1 {
        burst.push(
            alice
                .device
                .seal(&bob.address(), &format!("g{i}"), b"gap")
                .unwrap(),
        );
    }
    let last = burst.last().unwrap();
    assert!(matches!(
        bob.device.open(&alice.address(), last),
        Err(E2eError::TooManySkipped(_))
    ));
    // The refusal changed nothing: the burst still opens in order.
    for payload in &burst {
        bob.device.open(&alice.address(), payload).unwrap();
    }
}

/// A prekey message replayed (even after the session it started was archived) is refused,
/// and a one-time prekey works only once.
#[test]
fn prekey_messages_cannot_be_replayed() {
    let alice = peer("alice", 1, 5);
    let mut bob = peer("bob", 1, 5);
    alice.device.start_session("bob", &bob.bundle()).unwrap();
    let prekey = alice.device.seal(&bob.address(), "p", b"hello").unwrap();
    bob.device.open(&alice.address(), &prekey).unwrap();
    assert!(bob.device.open(&alice.address(), &prekey).is_err());
    let secrets_before = bob.device.one_time_prekey_secrets().unwrap();
    assert_eq!(
        secrets_before, 4,
        "the used one-time prekey secret is erased"
    );
    // A second device state that lost the session (as after archiving) still refuses it.
    for _ in 0..6 {
        let other = peer("alice", 1, 0);
        // Same address, new identities: only to push sessions into Bob's archive.
        other.device.start_session("bob", &bob.bundle()).unwrap();
        let sealed = other.device.seal(&bob.address(), "x", b"x").unwrap();
        let _ = bob.device.open(&alice.address(), &sealed);
    }
    assert!(bob.device.open(&alice.address(), &prekey).is_err());
}

/// Without one-time prekeys, sessions start from the signed prekey alone; without a valid
/// signed prekey, the baseline still seals; a bad signature is refused.
#[test]
fn sessions_start_without_one_time_prekeys_and_bad_signatures_are_refused() {
    let alice = peer("alice", 1, 0);
    let mut bob = peer("bob", 1, 0);
    let bundle = bob.bundle();
    assert!(bundle.one_time_prekey.is_none());
    alice.device.start_session("bob", &bundle).unwrap();
    let sealed = alice
        .device
        .seal(&bob.address(), "1", b"no one-time key")
        .unwrap();
    assert_eq!(
        &bob.device
            .open(&alice.address(), &sealed)
            .unwrap()
            .plaintext[..],
        b"no one-time key"
    );

    let carol = peer("carol", 1, 0);
    let mut forged = bob.bundle();
    let mut signed = forged.signed_prekey.clone().unwrap();
    let mut signature = signed.signature.to_vec();
    signature[3] ^= 1;
    signed.signature = signature.into();
    forged.signed_prekey = Some(signed);
    assert!(matches!(
        carol.device.start_session("bob", &forged),
        Err(E2eError::BadSignature)
    ));
    let mut no_signed = bob.bundle();
    no_signed.signed_prekey = None;
    assert!(carol.device.start_session("bob", &no_signed).is_err());
    assert!(!carol.device.has_session(&bob.address()).unwrap());
    let baseline = carol
        .device
        .seal_baseline(&bob.address(), &identity_of(&bob), "b", b"baseline")
        .unwrap();
    assert_eq!(
        &bob.device
            .open(&carol.address(), &baseline)
            .unwrap()
            .plaintext[..],
        b"baseline"
    );
    assert!(matches!(
        bob.device.open(&carol.address(), &baseline),
        Err(E2eError::Replay)
    ));
}

/// Both sides starting a session at once still converge on one that works both ways.
#[test]
fn simultaneous_session_starts_converge() {
    let mut alice = peer("alice", 1, 5);
    let mut bob = peer("bob", 1, 5);
    alice.device.start_session("bob", &bob.bundle()).unwrap();
    bob.device.start_session("alice", &alice.bundle()).unwrap();
    let from_alice = alice.device.seal(&bob.address(), "a", b"a").unwrap();
    let from_bob = bob.device.seal(&alice.address(), "b", b"b").unwrap();
    bob.device.open(&alice.address(), &from_alice).unwrap();
    alice.device.open(&bob.address(), &from_bob).unwrap();
    for round in 0..5 {
        let text = format!("a{round}");
        let sealed = alice
            .device
            .seal(&bob.address(), &text, text.as_bytes())
            .unwrap();
        assert_eq!(
            bob.device
                .open(&alice.address(), &sealed)
                .unwrap()
                .plaintext
                .to_vec(),
            text.as_bytes()
        );
        let text = format!("b{round}");
        let sealed = bob
            .device
            .seal(&alice.address(), &text, text.as_bytes())
            .unwrap();
        assert_eq!(
            alice
                .device
                .open(&bob.address(), &sealed)
                .unwrap()
                .plaintext
                .to_vec(),
            text.as_bytes()
        );
    }
}

/// Trust on first use: the first key is recorded, the same key passes, a new key is reported
/// and drops the sessions made with the old one.
#[test]
fn identity_changes_are_reported() {
    let alice = peer("alice", 1, 0);
    let mut bob = peer("bob", 1, 1);
    let bob_identity = identity_of(&bob);
    let bob_signing = bob.device.signing_public();
    assert_eq!(
        alice
            .device
            .check_identity(&bob.address(), &bob_identity, &bob_signing)
            .unwrap(),
        IdentityCheck::FirstSeen
    );
    alice.device.start_session("bob", &bob.bundle()).unwrap();
    assert_eq!(
        alice
            .device
            .check_identity(&bob.address(), &bob_identity, &bob_signing)
            .unwrap(),
        IdentityCheck::Unchanged
    );
    let new_bob = peer("bob", 1, 1);
    assert_eq!(
        alice
            .device
            .check_identity(
                &bob.address(),
                &identity_of(&new_bob),
                &new_bob.device.signing_public()
            )
            .unwrap(),
        IdentityCheck::Changed {
            previous_identity: bob_identity
        }
    );
    assert!(!alice.device.has_session(&bob.address()).unwrap());
}

/// The device's state survives a restart with a file store (0600), and no secret of it shows
/// in Debug output.
#[test]
fn file_store_keeps_identity_and_sessions_across_restarts() {
    let home = tempfile::tempdir().unwrap();
    let open = || {
        let store =
            Arc::new(bluetick_client::e2e::FileKeyStore::open(home.path().join("keys")).unwrap());
        E2eDevice::load_or_create(DeviceAddress::new("bob", 1), store as KeyStoreRef).unwrap()
    };
    let bob = open();
    let request = bob.prekeys_to_publish(2, true).unwrap();
    let identity = bob.identity_public();
    drop(bob);
    let alice = peer("alice", 1, 0);
    let bundle = PreKeyBundle {
        device_id: 1,
        identity_key: request.identity_key.clone(),
        signing_key: request.signing_key.clone(),
        signed_prekey: request.signed_prekey.clone(),
        one_time_prekey: request.one_time_prekeys.first().cloned(),
    };
    alice.device.start_session("bob", &bundle).unwrap();
    let sealed = alice
        .device
        .seal(&DeviceAddress::new("bob", 1), "1", b"persisted")
        .unwrap();
    let bob = open();
    assert_eq!(bob.identity_public(), identity);
    assert_eq!(
        &bob.open(&alice.address(), &sealed).unwrap().plaintext[..],
        b"persisted"
    );
    let reply = bob.seal(&alice.address(), "2", b"back").unwrap();
    drop(bob);
    let bob = open();
    let again = bob.seal(&alice.address(), "3", b"again").unwrap();
    alice
        .device
        .open(&DeviceAddress::new("bob", 1), &reply)
        .unwrap();
    alice
        .device
        .open(&DeviceAddress::new("bob", 1), &again)
        .unwrap();
    assert!(!format!("{bob:?}").contains("secret\""));
}
