//! One function per subcommand.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bluetick_client::e2e::media::{download_decrypted_path, upload_encrypted_path};
use bluetick_client::e2e::{MediaAttachment, safety_number_for, setup_device};
use bluetick_client::{
    BluetickClient, ChatConfig, ChatEvent, Content, LastSeenVisibility, SecureChat, SecureEvent,
    SecureEvents, TickStatus, media::is_sha256_hex, register,
};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::AsyncBufReadExt;

use crate::display::{Display, Flow, ReadPolicy, describe_presence};
use crate::profile::Profile;
use crate::{Command, Visibility, render};

/// How long a command waits for the server to store a send.
const SEND_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `read` waits for the backlog.
const BACKLOG_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one subcommand for `profile`.
///
/// # Errors
/// Whatever the command hit.
pub async fn run(profile: Profile, command: Command) -> Result<()> {
    match command {
        Command::Register {
            user,
            name,
            server,
            media,
            force,
        } => register_user(&profile, &user, name.as_deref(), &server, &media, force).await,
        Command::AddDevice { new_profile } => add_device(&profile, &new_profile).await,
        Command::Whoami => whoami(&profile),
        Command::Devices { user } => devices(&profile, user).await,
        Command::Send { user, text, wait } => {
            let client = client_for(&profile)?;
            let content = Content::Text(text.join(" "));
            send_and_wait(&profile, &client, &user, Outgoing::Content(&content), wait).await
        }
        Command::Listen { read, save_dir } => {
            let policy = if read {
                ReadPolicy::All
            } else {
                ReadPolicy::Never
            };
            listen(&profile, policy, save_dir).await
        }
        Command::Chat { user, save_dir } => chat(&profile, &user, save_dir).await,
        Command::Read => read(&profile).await,
        Command::LastSeen { user } => {
            let presence = client_for(&profile)?.last_seen(&user).await?;
            println!("{}", describe_presence(&presence, render::now_ms()));
            Ok(())
        }
        Command::Watch { users } => watch(&profile, users).await,
        Command::Privacy { visibility } => {
            let last_seen = match visibility {
                Visibility::Everyone => LastSeenVisibility::Everyone,
                Visibility::Contacts => LastSeenVisibility::Contacts,
                Visibility::Nobody => LastSeenVisibility::Nobody,
            };
            client_for(&profile)?.set_privacy(last_seen).await?;
            println!("last seen is now visible to: {visibility:?}");
            Ok(())
        }
        Command::Contacts { users } => {
            let count = users.len();
            client_for(&profile)?.set_contacts(users).await?;
            println!("contact list replaced ({count} contacts)");
            Ok(())
        }
        Command::Upload { file } => {
            let client = client_for(&profile)?;
            let uploaded = upload_with_bar(&client, &file).await?;
            println!(
                "uploaded {} ({} bytes{})",
                file.display(),
                uploaded.size,
                if uploaded.deduplicated {
                    ", already stored"
                } else {
                    ""
                }
            );
            println!("sha256 {}", uploaded.sha256);
            println!("fetch with: bluetick download {} <out>", uploaded.sha256);
            Ok(())
        }
        Command::Download { sha256, out } => {
            let client = client_for(&profile)?;
            let sha256 = sha256.to_ascii_lowercase();
            if !is_sha256_hex(&sha256) {
                bail!("{sha256:?} is not a SHA-256 (64 hex digits)");
            }
            if let Some(attachment) = profile.load_attachments()?.get(&sha256) {
                let size = download_decrypted_with_bar(&client, attachment, &out).await?;
                println!(
                    "saved {} ({size} bytes, sha256 verified, decrypted)",
                    out.display()
                );
                return Ok(());
            }
            let size = download_with_bar(&client, &sha256, &out).await?;
            println!("saved {} ({size} bytes, sha256 verified)", out.display());
            Ok(())
        }
        Command::SafetyNumber { user } => safety_number(&profile, &user).await,
        Command::SendPhoto {
            user,
            file,
            caption,
            mime,
            wait,
        } => {
            let client = client_for(&profile)?;
            let mime = mime.unwrap_or_else(|| render::guess_mime(&file).to_string());
            let attachment = upload_encrypted_with_bar(&client, &file, &mime, caption).await?;
            send_and_wait(
                &profile,
                &client,
                &user,
                Outgoing::Attachment(&attachment),
                wait,
            )
            .await
        }
    }
}

fn client_for(profile: &Profile) -> Result<BluetickClient> {
    Ok(BluetickClient::new(profile.load_credentials()?)?)
}

async fn register_user(
    profile: &Profile,
    user: &str,
    name_opt: Option<&str>,
    server: &str,
    media: &str,
    force: bool,
) -> Result<()> {
    if profile.exists() && !force {
        bail!(
            "profile {:?} already holds credentials; use --force to replace them or --profile NAME",
            profile.name
        );
    }
    let credentials = register(server, media, user, name_opt.unwrap_or(user)).await?;
    profile.save_credentials(&credentials)?;
    println!(
        "registered {} (device {}); credentials saved in {}",
        credentials.user_id,
        credentials.device_id,
        profile.credentials_path().display()
    );
    publish_keys(profile, &BluetickClient::new(credentials)?).await
}

/// Creates (or loads) the device's keys and publishes the public halves.
async fn publish_keys(profile: &Profile, client: &BluetickClient) -> Result<()> {
    let device = setup_device(client, profile.key_store()?)
        .await
        .context("could not publish the device's end-to-end keys")?;
    println!(
        "end-to-end encryption keys published (identity {}…); private keys stay in {}",
        &hex::encode(device.identity_public())[..16],
        profile.dir.join("keys").display()
    );
    Ok(())
}

async fn add_device(profile: &Profile, new_profile_name: &str) -> Result<()> {
    let client = client_for(profile)?;
    let home = profile
        .dir
        .parent()
        .context("profile folder has no parent")?;
    let new_profile = Profile::new(home, new_profile_name)?;
    if new_profile.exists() {
        bail!("profile {new_profile_name:?} already exists");
    }
    let credentials = client.add_device().await?;
    new_profile.save_credentials(&credentials)?;
    println!(
        "added device {} to {}; use it with --profile {new_profile_name}",
        credentials.device_id, credentials.user_id
    );
    publish_keys(&new_profile, &BluetickClient::new(credentials)?).await
}

fn whoami(profile: &Profile) -> Result<()> {
    let credentials = profile.load_credentials()?;
    let inbox = profile.load_inbox()?;
    println!("profile   {}", profile.name);
    println!("user      {}", credentials.user_id);
    println!("device    {}", credentials.device_id);
    println!("gateway   {}", credentials.gateway_url);
    println!("media     {}", credentials.media_url);
    println!("unread    {}", inbox.messages.len());
    Ok(())
}

async fn devices(profile: &Profile, user_opt: Option<String>) -> Result<()> {
    let client = client_for(profile)?;
    let user = user_opt.unwrap_or_else(|| client.credentials().user_id.clone());
    let list = client.list_devices(&user).await?;
    let ids: Vec<String> = list.device_ids.iter().map(u32::to_string).collect();
    println!(
        "{} ({}): devices {}",
        user,
        render::sanitize(&list.display_name),
        ids.join(", ")
    );
    Ok(())
}

/// What `send` and `send-photo` send.
#[derive(Debug, Clone, Copy)]
enum Outgoing<'a> {
    Content(&'a Content),
    Attachment(&'a MediaAttachment),
}

/// Opens an encrypted chat session for the profile's device (publishing keys if needed).
async fn open_secure(
    profile: &Profile,
    client: &BluetickClient,
    config: ChatConfig,
) -> Result<(SecureChat, SecureEvents)> {
    Ok(SecureChat::open(client, profile.key_store()?, config).await?)
}

/// Seals and sends `outgoing`, prints the single tick, then waits up to `wait` for the
/// double and blue ticks. Incoming messages are left on the server (not acknowledged) for
/// `listen`/`read`.
async fn send_and_wait(
    profile: &Profile,
    client: &BluetickClient,
    user: &str,
    outgoing: Outgoing<'_>,
    wait: Duration,
) -> Result<()> {
    let config = ChatConfig {
        auto_ack_delivered: false,
        auto_confirm_receipts: false,
        ..ChatConfig::default()
    };
    let (chat, mut events) = open_secure(profile, client, config).await?;
    let result = send_on_session(profile, &chat, &mut events, user, outgoing, wait).await;
    chat.close().await?;
    result
}

async fn send_on_session(
    profile: &Profile,
    chat: &SecureChat,
    events: &mut SecureEvents,
    user: &str,
    outgoing: Outgoing<'_>,
    wait: Duration,
) -> Result<()> {
    let colour = render::colour_enabled();
    let (client_msg_id, summary) = match outgoing {
        Outgoing::Content(content) => (chat.send_content(user, content).await?, content.summary()),
        Outgoing::Attachment(attachment) => (
            chat.send_attachment(user, attachment).await?,
            format!(
                "[{} {}, {} bytes, encrypted]",
                attachment.mime,
                attachment.name.as_deref().unwrap_or("file"),
                attachment.size
            ),
        ),
    };
    let deadline = tokio::time::Instant::now() + SEND_TIMEOUT;
    let message_id = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match events
            .next_event(left)
            .await
            .with_context(|| format!("message to {user} not sent"))?
        {
            SecureEvent::IdentityChanged(warning) => {
                println!("⚠ {}", render::sanitize(&warning.to_string()));
            }
            SecureEvent::Chat(ChatEvent::Sent {
                client_msg_id: id,
                message_id,
                ..
            }) if id == client_msg_id => break message_id,
            SecureEvent::Chat(ChatEvent::SendFailed {
                client_msg_id: id,
                code,
                message,
                ..
            }) if id == client_msg_id => {
                bail!("message to {user} not sent ({code:?}: {message})");
            }
            SecureEvent::Chat(ChatEvent::Closed {
                error_opt: Some(error),
            }) => return Err(error.into()),
            _ => {}
        }
    };
    let mut sent_log = profile.load_sent_log()?;
    sent_log.record_sent(message_id, user, &summary);
    profile.save_sent_log(&sent_log)?;
    println!(
        "{} sent to {user}, end-to-end encrypted (message {message_id})",
        render::ticks(TickStatus::Sent, colour)
    );
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        match events.next_event(left).await {
            Ok(SecureEvent::Chat(ChatEvent::Receipt {
                receipt_id,
                message_id: id,
                recipient,
                status,
                ..
            })) if id == message_id => {
                chat.chat().confirm_receipts(vec![receipt_id]).await?;
                sent_log.record_status(message_id, status);
                profile.save_sent_log(&sent_log)?;
                let word = if status == TickStatus::Read {
                    "read"
                } else {
                    "delivered"
                };
                println!("{} {word} by {recipient}", render::ticks(status, colour));
                if status == TickStatus::Read {
                    break;
                }
            }
            Ok(SecureEvent::Chat(ChatEvent::Closed {
                error_opt: Some(error),
            })) => return Err(error.into()),
            Ok(SecureEvent::Chat(ChatEvent::Closed { error_opt: None })) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Ok(())
}

async fn listen(
    profile: &Profile,
    policy: ReadPolicy,
    save_dir_opt: Option<std::path::PathBuf>,
) -> Result<()> {
    let client = client_for(profile)?;
    if let Some(save_dir) = &save_dir_opt {
        std::fs::create_dir_all(save_dir)
            .with_context(|| format!("cannot create {}", save_dir.display()))?;
    }
    let mut display = Display::new(profile.clone(), client.clone(), policy)?;
    display.save_dir_opt = save_dir_opt;
    let (chat, mut events) = open_secure(profile, &client, ChatConfig::default()).await?;
    println!("listening, end-to-end encrypted (Ctrl-C to stop)");
    let result = loop {
        tokio::select! {
            event_opt = events.recv() => match event_opt {
                None => break Ok(()),
                Some(event) => match display.handle(chat.chat(), event).await {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Stop) => break Ok(()),
                    Err(error) => break Err(error),
                },
            },
            _ = tokio::signal::ctrl_c() => break Ok(()),
        }
    };
    chat.close().await?;
    result
}

async fn chat(
    profile: &Profile,
    peer: &str,
    save_dir_opt: Option<std::path::PathBuf>,
) -> Result<()> {
    let client = client_for(profile)?;
    if let Some(save_dir) = &save_dir_opt {
        std::fs::create_dir_all(save_dir)
            .with_context(|| format!("cannot create {}", save_dir.display()))?;
    }
    let mut display = Display::new(
        profile.clone(),
        client.clone(),
        ReadPolicy::From(peer.to_string()),
    )?;
    display.save_dir_opt = save_dir_opt;
    display.verbose_connection = false;
    let (chat, mut events) = open_secure(profile, &client, ChatConfig::default()).await?;
    chat.chat().watch_presence(vec![peer.to_string()]).await?;
    println!(
        "chatting with {peer}, end-to-end encrypted: type a line and press Enter; /photo FILE sends a file; /quit or Ctrl-D ends"
    );

    // Unread messages from the peer kept locally by earlier sessions.
    let earlier: Vec<_> = display
        .inbox
        .messages
        .values()
        .filter(|stored| stored.sender_user_id == peer)
        .cloned()
        .collect();
    for stored in &earlier {
        println!(
            "[{}] {}: {}",
            render::clock(stored.sent_at_ms),
            render::sanitize(&stored.sender_user_id),
            render::payload_summary(&stored.payload())
        );
    }
    if !earlier.is_empty() {
        let ids: Vec<u64> = earlier.iter().map(|stored| stored.message_id).collect();
        chat.chat().mark_read(ids.clone()).await?;
        display.inbox.remove(&ids);
        profile.save_inbox(&display.inbox)?;
    }

    let (lines_tx, mut lines_rx) = tokio::sync::mpsc::channel::<String>(16);
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if lines_tx.send(line).await.is_err() {
                break;
            }
        }
    });
    let result = loop {
        tokio::select! {
            event_opt = events.recv() => match event_opt {
                None => break Ok(()),
                Some(event) => match display.handle(chat.chat(), event).await {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Stop) => break Ok(()),
                    Err(error) => break Err(error),
                },
            },
            line_opt = lines_rx.recv() => {
                let Some(line) = line_opt else { break Ok(()) };
                let line = line.trim_end().to_string();
                if line.is_empty() {
                    continue;
                }
                if line == "/quit" {
                    break Ok(());
                }
                let sent = if let Some(path) = line.strip_prefix("/photo ") {
                    let file = Path::new(path.trim());
                    let mime = render::guess_mime(file);
                    match upload_encrypted_with_bar(&client, file, mime, None).await {
                        Ok(attachment) => {
                            let summary = format!(
                                "[{mime} {}, {} bytes, encrypted]",
                                attachment.name.as_deref().unwrap_or("file"),
                                attachment.size
                            );
                            chat.send_attachment(peer, &attachment).await.map(|id| (id, summary))
                        }
                        Err(error) => {
                            println!("  ✗ {error:#}");
                            continue;
                        }
                    }
                } else {
                    let content = Content::Text(line);
                    chat.send_content(peer, &content).await.map(|id| (id, content.summary()))
                };
                match sent {
                    Ok((client_msg_id, summary)) => display.note_send(client_msg_id, peer, summary),
                    Err(error) => println!("  ✗ not sent: {error}"),
                }
            }
            _ = tokio::signal::ctrl_c() => break Ok(()),
        }
    };
    chat.close().await?;
    // Show what the close flushed (single ticks of the last sends).
    while let Ok(event) = events.next_event(Duration::from_millis(50)).await {
        if display.handle(chat.chat(), event).await? == Flow::Stop {
            break;
        }
    }
    result
}

async fn read(profile: &Profile) -> Result<()> {
    let client = client_for(profile)?;
    let config = ChatConfig {
        // Receipts stay on the server for `listen` to show.
        auto_confirm_receipts: false,
        ..ChatConfig::default()
    };
    let (chat, mut events) = open_secure(profile, &client, config).await?;
    let mut inbox = profile.load_inbox()?;
    let deadline = tokio::time::Instant::now() + BACKLOG_TIMEOUT;
    let mut undecryptable = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match events.next_event(left).await {
            Ok(SecureEvent::Message(message)) => {
                if let Some(attachment) = &message.attachment_opt {
                    profile.remember_attachment(attachment)?;
                }
                inbox.add(crate::profile::StoredMessage::from_opened(&message));
                profile.save_inbox(&inbox)?;
            }
            Ok(SecureEvent::Undecryptable { message, error }) => {
                let sender = message.sender.unwrap_or_default();
                println!(
                    "! a message from {}/{} could not be opened: {error}",
                    render::sanitize(&sender.user_id),
                    sender.device_id
                );
                undecryptable.push(message.message_id);
            }
            Ok(SecureEvent::IdentityChanged(warning)) => {
                println!("⚠ {}", render::sanitize(&warning.to_string()));
            }
            Ok(SecureEvent::Chat(ChatEvent::BacklogDone { .. })) => break,
            Ok(SecureEvent::Chat(ChatEvent::Closed { error_opt })) => {
                if let Some(error) = error_opt {
                    return Err(error.into());
                }
                break;
            }
            Ok(_) => {}
            Err(_) => {
                println!("(the server did not finish sending stored messages in time)");
                break;
            }
        }
    }
    if inbox.messages.is_empty() {
        println!("no unread messages");
    }
    for stored in inbox.messages.values() {
        println!(
            "[{}] {}: {}",
            render::utc_timestamp(stored.sent_at_ms),
            render::sanitize(&stored.sender_user_id),
            render::payload_summary(&stored.payload())
        );
        if let Ok(Content::Media { sha256, name, .. }) = Content::decode(&stored.payload()) {
            let file_name = render::safe_file_name(name.as_deref(), "media");
            println!(
                "    bluetick download {} '{file_name}'",
                render::sanitize(&sha256)
            );
        }
    }
    let mut ids: Vec<u64> = inbox.messages.keys().copied().collect();
    ids.extend(undecryptable);
    if !ids.is_empty() {
        chat.chat().mark_read(ids.clone()).await?;
    }
    chat.close().await?;
    inbox.remove(&ids);
    profile.save_inbox(&inbox)?;
    Ok(())
}

async fn safety_number(profile: &Profile, user: &str) -> Result<()> {
    let client = client_for(profile)?;
    let device = setup_device(&client, profile.key_store()?).await?;
    let number = safety_number_for(&client, &device, user).await?;
    for warning in &number.warnings {
        println!("⚠ {}", render::sanitize(&warning.to_string()));
    }
    println!(
        "safety number with {}:\n\n    {}\n    {}\n",
        render::sanitize(user),
        &number.number[..35],
        &number.number[36..]
    );
    println!(
        "compare it with {}'s screen (`bluetick safety-number {}`); if they match, no one is in between",
        render::sanitize(user),
        render::sanitize(&client.credentials().user_id)
    );
    Ok(())
}

async fn watch(profile: &Profile, users: Vec<String>) -> Result<()> {
    let client = client_for(profile)?;
    let mut stream = client.watch_presence(users).await?;
    loop {
        tokio::select! {
            next = stream.message() => match next? {
                Some(presence) => println!("{}", describe_presence(&presence, render::now_ms())),
                None => return Ok(()),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Returns a byte progress bar on stderr (hidden when stderr is not a terminal).
pub(crate) fn progress_bar(total_opt: Option<u64>) -> ProgressBar {
    let bar = ProgressBar::new(total_opt.unwrap_or(0));
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{bar:32}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

async fn upload_with_bar(
    client: &BluetickClient,
    file: &Path,
) -> Result<bluetick_client::Uploaded> {
    let size = tokio::fs::metadata(file)
        .await
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    let bar = progress_bar(Some(size));
    let progress = {
        let bar = bar.clone();
        move |done: u64, _total_opt: Option<u64>| bar.set_position(done)
    };
    let result = client.upload_path(file, progress).await;
    bar.finish_and_clear();
    result.with_context(|| format!("upload of {} failed", file.display()))
}

async fn upload_encrypted_with_bar(
    client: &BluetickClient,
    file: &Path,
    mime: &str,
    caption_opt: Option<String>,
) -> Result<MediaAttachment> {
    let size = tokio::fs::metadata(file)
        .await
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    let bar = progress_bar(Some(size));
    let progress = {
        let bar = bar.clone();
        move |done: u64, _total_opt: Option<u64>| bar.set_position(done)
    };
    let result = upload_encrypted_path(client, file, mime, caption_opt, progress).await;
    bar.finish_and_clear();
    result.with_context(|| format!("encrypted upload of {} failed", file.display()))
}

async fn download_decrypted_with_bar(
    client: &BluetickClient,
    attachment: &MediaAttachment,
    out: &Path,
) -> Result<u64> {
    let bar = progress_bar(Some(attachment.size));
    let progress = {
        let bar = bar.clone();
        move |done: u64, total_opt: Option<u64>| {
            if let Some(total) = total_opt {
                bar.set_length(total);
            }
            bar.set_position(done);
        }
    };
    let result = download_decrypted_path(client, attachment, out, progress).await;
    bar.finish_and_clear();
    result.with_context(|| format!("download of {} failed", attachment.sha256))
}

async fn download_with_bar(client: &BluetickClient, sha256: &str, out: &Path) -> Result<u64> {
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
    let result = client.download_path(sha256, out, progress).await;
    bar.finish_and_clear();
    result.with_context(|| format!("download of {sha256} failed"))
}
