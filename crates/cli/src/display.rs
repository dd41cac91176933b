//! Shows an encrypted chat session's events and keeps the profile's local state in step:
//! opened messages go to the local inbox (unless marked read on display), own messages'
//! ticks go to the sent log, keys of received media to the attachment list; identity-key
//! changes and messages that do not open are shown as warnings.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use bluetick_client::e2e::MediaAttachment;
use bluetick_client::e2e::media::download_decrypted_path;
use bluetick_client::{
    BluetickClient, ChatEvent, ChatHandle, PresenceState, SecureEvent, SecureMessage, TickStatus,
};

use crate::commands::progress_bar;
use crate::profile::{Inbox, Profile, SentLog, StoredMessage};
use crate::render;

/// Whether the loop goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    Stop,
}

/// Which displayed messages are marked read.
#[derive(Debug, Clone)]
pub(crate) enum ReadPolicy {
    /// None: they stay unread in the local inbox.
    Never,
    /// All of them.
    All,
    /// Those from this user (the `chat` peer).
    From(String),
}

pub(crate) struct Display {
    pub(crate) profile: Profile,
    pub(crate) client: BluetickClient,
    pub(crate) colour: bool,
    pub(crate) inbox: Inbox,
    pub(crate) sent_log: SentLog,
    pub(crate) read_policy: ReadPolicy,
    pub(crate) save_dir_opt: Option<PathBuf>,
    /// Summaries of sends waiting for their single tick, by client_msg_id.
    pub(crate) pending_summaries: HashMap<String, (String, String)>,
    /// Print the backlog banner and first-connect line.
    pub(crate) verbose_connection: bool,
}

impl Display {
    pub(crate) fn new(
        profile: Profile,
        client: BluetickClient,
        read_policy: ReadPolicy,
    ) -> Result<Self> {
        Ok(Self {
            inbox: profile.load_inbox()?,
            sent_log: profile.load_sent_log()?,
            profile,
            client,
            colour: render::colour_enabled(),
            read_policy,
            save_dir_opt: None,
            pending_summaries: HashMap::new(),
            verbose_connection: true,
        })
    }

    /// Remembers what a send said, to show it with its ticks.
    pub(crate) fn note_send(&mut self, client_msg_id: String, to: &str, summary: String) {
        self.pending_summaries
            .insert(client_msg_id, (to.to_string(), summary));
    }

    pub(crate) async fn show_message(
        &mut self,
        chat: &ChatHandle,
        message: &SecureMessage,
    ) -> Result<()> {
        println!(
            "[{}] {}: {}",
            render::clock(message.sent_at_ms),
            render::sanitize(&message.sender.user_id),
            render::sanitize(&message.content.summary())
        );
        if let Some(attachment) = &message.attachment_opt {
            self.profile.remember_attachment(attachment)?;
            self.show_media(attachment).await;
        }
        let mark_read = match &self.read_policy {
            ReadPolicy::Never => false,
            ReadPolicy::All => true,
            ReadPolicy::From(user) => *user == message.sender.user_id,
        };
        if mark_read {
            chat.mark_read(vec![message.message_id]).await?;
            self.inbox.remove(&[message.message_id]);
        } else {
            self.inbox.add(StoredMessage::from_opened(message));
        }
        self.profile.save_inbox(&self.inbox)
    }

    async fn show_media(&self, attachment: &MediaAttachment) {
        let safe_sha = render::sanitize(&attachment.sha256);
        let file_name = render::safe_file_name(
            attachment.name.as_deref(),
            &safe_sha.chars().take(16).collect::<String>(),
        );
        let Some(save_dir) = &self.save_dir_opt else {
            println!("    encrypted file, sha256 {safe_sha}");
            println!("    bluetick download {safe_sha} '{file_name}'");
            return;
        };
        let mut target = save_dir.join(&file_name);
        if target.exists() {
            target = save_dir.join(format!(
                "{}-{file_name}",
                safe_sha.chars().take(8).collect::<String>()
            ));
        }
        let bar = progress_bar(None);
        let progress = {
            let bar = bar.clone();
            move |done: u64, total_opt: Option<u64>| {
                if let Some(total) = total_opt {
                    bar.set_length(total);
                }
                bar.set_position(done);
            }
        };
        let result = download_decrypted_path(&self.client, attachment, &target, progress).await;
        bar.finish_and_clear();
        match result {
            Ok(size) => println!(
                "    saved {} ({size} bytes, hash verified, decrypted)",
                target.display()
            ),
            Err(error) => println!("    could not download {safe_sha}: {error}"),
        }
    }

    fn describe_own(&self, message_id: u64) -> String {
        match self.sent_log.entries.get(&message_id) {
            Some(entry) => format!("to {}: {}", entry.to, entry.summary),
            None => format!("message {message_id}"),
        }
    }

    /// Shows one event; returns whether to go on.
    pub(crate) async fn handle(&mut self, chat: &ChatHandle, event: SecureEvent) -> Result<Flow> {
        let event = match event {
            SecureEvent::Message(message) => {
                self.show_message(chat, &message).await?;
                return Ok(Flow::Continue);
            }
            SecureEvent::Undecryptable { message, error } => {
                let sender = message.sender.unwrap_or_default();
                println!(
                    "! a message from {}/{} could not be opened: {error}",
                    render::sanitize(&sender.user_id),
                    sender.device_id
                );
                return Ok(Flow::Continue);
            }
            SecureEvent::IdentityChanged(warning) => {
                println!("⚠ {}", render::sanitize(&warning.to_string()));
                println!(
                    "  check with: bluetick safety-number {}",
                    render::sanitize(&warning.device.user_id)
                );
                return Ok(Flow::Continue);
            }
            SecureEvent::Chat(event) => event,
        };
        match event {
            ChatEvent::Connected {
                device, reconnects, ..
            } => {
                if reconnects > 0 {
                    println!("reconnected");
                } else if self.verbose_connection {
                    println!("connected as {device}");
                }
            }
            ChatEvent::BacklogDone { messages, receipts } => {
                if self.verbose_connection && (messages > 0 || receipts > 0) {
                    println!("— caught up: {messages} stored messages, {receipts} receipts —");
                }
            }
            ChatEvent::Disconnected { error, retry_in } => {
                println!(
                    "connection lost ({error}); retrying in {:.1}s",
                    retry_in.as_secs_f64()
                );
            }
            ChatEvent::Message(message) => {
                // The secure layer opens every message; a raw one never reaches here.
                println!("! unopened message {}", message.message_id);
            }
            ChatEvent::Sent {
                client_msg_id,
                message_id,
                ..
            } => {
                let (to, summary) = self
                    .pending_summaries
                    .remove(&client_msg_id)
                    .unwrap_or_else(|| (String::from("?"), String::new()));
                self.sent_log.record_sent(message_id, &to, &summary);
                self.profile.save_sent_log(&self.sent_log)?;
                println!(
                    "  {} {}",
                    render::ticks(TickStatus::Sent, self.colour),
                    self.describe_own(message_id)
                );
            }
            ChatEvent::SendFailed {
                client_msg_id,
                code,
                message,
                ..
            } => {
                let summary = self
                    .pending_summaries
                    .remove(&client_msg_id)
                    .map(|(to, summary)| format!("to {to}: {summary}"))
                    .unwrap_or_default();
                println!("  ✗ not sent {summary} ({code:?}: {message})");
            }
            ChatEvent::Receipt {
                message_id,
                recipient,
                status,
                ..
            } => {
                self.sent_log.record_status(message_id, status);
                self.profile.save_sent_log(&self.sent_log)?;
                println!(
                    "  {} {} (by {recipient})",
                    render::ticks(status, self.colour),
                    self.describe_own(message_id)
                );
            }
            ChatEvent::Presence(presence) => {
                println!("{}", describe_presence(&presence, render::now_ms()))
            }
            ChatEvent::Typing(typing) => {
                if typing.active {
                    let sender = typing.sender.unwrap_or_default();
                    println!("{} is typing…", render::sanitize(&sender.user_id));
                }
            }
            ChatEvent::Error(error) => {
                println!(
                    "! the server refused a frame ({:?}): {}",
                    tonic_code(error.code),
                    render::sanitize(&error.message)
                );
            }
            ChatEvent::Closed { error_opt } => {
                if let Some(error) = error_opt {
                    return Err(error.into());
                }
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }
}

fn tonic_code(code: i32) -> bluetick_client::Code {
    bluetick_client::Code::from_i32(code)
}

/// Returns a presence as a sentence.
pub(crate) fn describe_presence(presence: &PresenceState, now_ms: u64) -> String {
    let user = render::sanitize(&presence.user_id);
    if presence.hidden {
        format!("{user}'s last seen is hidden")
    } else if presence.online {
        format!("● {user} is online")
    } else if presence.last_seen_ms == 0 {
        format!("{user} has not been seen yet")
    } else {
        format!(
            "{user} was last seen {} ({})",
            render::relative(presence.last_seen_ms, now_ms),
            render::utc_timestamp(presence.last_seen_ms)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_sentences() {
        let now = 1_700_000_000_000;
        let mut presence = PresenceState {
            user_id: "bob".into(),
            online: true,
            last_seen_ms: now,
            hidden: false,
        };
        assert_eq!(describe_presence(&presence, now), "● bob is online");
        presence.online = false;
        presence.last_seen_ms = now - 120_000;
        assert!(describe_presence(&presence, now).starts_with("bob was last seen 2 min ago"));
        presence.hidden = true;
        assert_eq!(
            describe_presence(&presence, now),
            "bob's last seen is hidden"
        );
    }
}
