"""End-to-end tests of the public gateway API through Python stubs generated from proto/.

They prove the contracts work from a language other than Rust: registration, the chat
stream, single/double/blue ticks, and authentication errors as gRPC status codes.
"""

from __future__ import annotations

import os
import uuid

import grpc
import pytest

from bluetick.common.v1 import common_pb2
from bluetick.gateway.v1 import (
    accounts_pb2,
    accounts_pb2_grpc,
    chat_pb2,
    presence_pb2,
    presence_pb2_grpc,
)
from chat_session import RPC_TIMEOUT_S, ChatSession, bearer


def unique_user_id(prefix: str) -> str:
    """Returns a fresh valid handle, e.g. "alice-1f2e3d4c"."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def register(channel: grpc.Channel, user_id: str) -> str:
    """Registers user_id and returns its first device's bearer token."""
    accounts = accounts_pb2_grpc.AccountsStub(channel)
    response = accounts.Register(
        accounts_pb2.RegisterRequest(user_id=user_id, display_name=user_id.title()),
        timeout=RPC_TIMEOUT_S,
    )
    assert response.device_id == 1, f"first device of {user_id} is {response.device_id}"
    assert response.token, f"Register returned no token for {user_id}"
    return response.token


def open_chat(channel: grpc.Channel, user_id: str, token: str) -> ChatSession:
    """Opens a chat stream and checks that it starts with Welcome for this device."""
    session = ChatSession(channel, token)
    welcome = session.expect("welcome", timeout_s=RPC_TIMEOUT_S)
    assert welcome.device.user_id == user_id
    assert welcome.device.device_id == 1
    if welcome.heartbeat_interval_ms > 0:
        # Heartbeat at half the server's interval so a slow CI machine never misses one.
        session.heartbeat_interval_s = welcome.heartbeat_interval_ms / 2000
    return session


def test_message_reaches_recipient_and_sender_sees_delivered_then_read(gateway_channel):
    """A message from A reaches B with the same id, payload and sender; A gets the single
    tick (SendAccepted) and then DELIVERED and READ receipts as B acknowledges."""
    alice = unique_user_id("alice")
    bob = unique_user_id("bob")
    alice_token = register(gateway_channel, alice)
    bob_token = register(gateway_channel, bob)

    alice_chat = open_chat(gateway_channel, alice, alice_token)
    bob_chat = open_chat(gateway_channel, bob, bob_token)
    try:
        payload = os.urandom(48)  # opaque to the server, as a sealed message would be
        client_msg_id = str(uuid.uuid4())
        alice_chat.send(
            chat_pb2.ClientFrame(
                send=chat_pb2.SendMessage(
                    client_msg_id=client_msg_id,
                    recipient_user_id=bob,
                    payloads=[chat_pb2.DevicePayload(device_id=0, payload=payload)],
                )
            )
        )

        accepted = alice_chat.expect(
            "send_accepted", lambda a: a.client_msg_id == client_msg_id
        )
        assert accepted.message_id != 0, "SendAccepted carries no message_id"
        assert not accepted.duplicate
        message_id = accepted.message_id

        inbound = bob_chat.expect("message", lambda m: m.message_id == message_id)
        assert inbound.payload == payload
        assert inbound.sender.user_id == alice
        assert inbound.sender.device_id == 1
        assert inbound.recipient_device_id == 1

        bob_chat.send(
            chat_pb2.ClientFrame(
                ack=chat_pb2.Acknowledge(
                    status=common_pb2.TICK_STATUS_DELIVERED, message_ids=[message_id]
                )
            )
        )
        delivered = alice_chat.expect(
            "receipt",
            lambda r: r.message_id == message_id
            and r.status == common_pb2.TICK_STATUS_DELIVERED,
        )
        assert delivered.recipient.user_id == bob
        assert delivered.recipient.device_id == 1

        bob_chat.send(
            chat_pb2.ClientFrame(
                ack=chat_pb2.Acknowledge(
                    status=common_pb2.TICK_STATUS_READ, message_ids=[message_id]
                )
            )
        )
        read = alice_chat.expect(
            "receipt",
            lambda r: r.message_id == message_id and r.status != common_pb2.TICK_STATUS_DELIVERED,
        )
        assert read.status == common_pb2.TICK_STATUS_READ, (
            f"expected a READ receipt, got {common_pb2.TickStatus.Name(read.status)}"
        )
        assert read.recipient.user_id == bob

        # Tell the server the receipts were processed, as a well-behaved client does.
        alice_chat.send(
            chat_pb2.ClientFrame(
                confirm_receipts=chat_pb2.ConfirmReceipts(
                    receipt_ids=[delivered.receipt_id, read.receipt_id]
                )
            )
        )
    finally:
        alice_chat.close()
        bob_chat.close()


@pytest.mark.parametrize(
    "metadata",
    [None, [("authorization", "Bearer not-a-real-token")]],
    ids=["no-token", "unknown-token"],
)
def test_presence_without_valid_token_is_unauthenticated(gateway_channel, metadata):
    """Presence/GetLastSeen without a valid bearer token fails with UNAUTHENTICATED."""
    target = unique_user_id("carol")
    register(gateway_channel, target)
    presence = presence_pb2_grpc.PresenceStub(gateway_channel)

    with pytest.raises(grpc.RpcError) as raised:
        presence.GetLastSeen(
            presence_pb2.GetLastSeenRequest(user_id=target),
            metadata=metadata,
            timeout=RPC_TIMEOUT_S,
        )
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, raised.value


def test_presence_with_token_answers_for_the_requested_user(gateway_channel):
    """The same GetLastSeen call succeeds with a valid token (control for the test above)."""
    target = unique_user_id("dave")
    register(gateway_channel, target)
    caller_token = register(gateway_channel, unique_user_id("erin"))
    presence = presence_pb2_grpc.PresenceStub(gateway_channel)

    response = presence.GetLastSeen(
        presence_pb2.GetLastSeenRequest(user_id=target),
        metadata=bearer(caller_token),
        timeout=RPC_TIMEOUT_S,
    )
    assert response.presence.user_id == target
    assert not response.presence.online
