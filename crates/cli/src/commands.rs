//! One function per subcommand.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bluetick_client::{
    BluetickClient, ChatConfig, ChatEvent, ChatEvents, ChatHandle, Content, LastSeenVisibility,
    TickStatus, media::is_sha256_hex, register,
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
            send_and_wait(
                &profile,
                &client,
                &user,
                &Content::Text(text.join(" ")),
                wait,
            )
            .await
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
            let size = download_with_bar(&client, &sha256, &out).await?;
            println!("saved {} ({size} bytes, sha256 verified)", out.display());
            Ok(())
        }
        Command::SendPhoto {
            user,
            file,
            caption,
            mime,
            wait,
        } => {
            let client = client_for(&profile)?;
            let uploaded = upload_with_bar(&client, &file).await?;
            let content = Content::Media {
                sha256: uploaded.sha256,
                size: uploaded.size,
                mime: mime.unwrap_or_else(|| render::guess_mime(&file).to_string()),
                name: file
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned()),
                caption,
            };
            send_and_wait(&profile, &client, &user, &content, wait).await
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
    Ok(())
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

/// Sends `content`, prints the single tick, then waits up to `wait` for the double and blue
/// ticks. Incoming messages are left on the server (not acknowledged) for `listen`/`read`.
async fn send_and_wait(
    profile: &Profile,
    client: &BluetickClient,
    user: &str,
    content: &Content,
    wait: Duration,
) -> Result<()> {
    let config = ChatConfig {
        auto_ack_delivered: false,
        auto_confirm_receipts: false,
        ..ChatConfig::default()
    };
    let (chat, mut events) = client.open_chat(config).await?;
    let result = send_on_session(profile, &chat, &mut events, user, content, wait).await;
    chat.close().await?;
    result
}

async fn send_on_session(
    profile: &Profile,
    chat: &ChatHandle,
    events: &mut ChatEvents,
    user: &str,
    content: &Content,
    wait: Duration,
) -> Result<()> {
    let colour = render::colour_enabled();
    let client_msg_id = chat.send_content(user, content).await?;
    let message_id = events
        .wait_sent(&client_msg_id, SEND_TIMEOUT)
        .await
        .with_context(|| format!("message to {user} not sent"))?;
    let summary = content.summary();
    let mut sent_log = profile.load_sent_log()?;
    sent_log.record_sent(message_id, user, &summary);
    profile.save_sent_log(&sent_log)?;
    println!(
        "{} sent to {user} (message {message_id})",
        render::ticks(TickStatus::Sent, colour)
    );
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let event = events
            .next_event_matching(
                |event| {
                    matches!(event, ChatEvent::Receipt { message_id: id, .. } if *id == message_id)
                        || matches!(event, ChatEvent::Closed { .. })
                },
                left,
            )
            .await;
        match event {
            Ok(ChatEvent::Receipt {
                receipt_id,
                recipient,
                status,
                ..
            }) => {
                chat.confirm_receipts(vec![receipt_id]).await?;
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
            Ok(ChatEvent::Closed {
                error_opt: Some(error),
            }) => return Err(error.into()),
            _ => break,
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
    let (chat, mut events) = client.open_chat(ChatConfig::default()).await?;
    println!("listening (Ctrl-C to stop)");
    let result = loop {
        tokio::select! {
            event_opt = events.recv() => match event_opt {
                None => break Ok(()),
                Some(event) => match display.handle(&chat, event).await {
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
    let (chat, mut events) = client.open_chat(ChatConfig::default()).await?;
    chat.watch_presence(vec![peer.to_string()]).await?;
    println!(
        "chatting with {peer}: type a line and press Enter; /photo FILE sends a file; /quit or Ctrl-D ends"
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
        chat.mark_read(ids.clone()).await?;
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
                Some(event) => match display.handle(&chat, event).await {
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
                let content = if let Some(path) = line.strip_prefix("/photo ") {
                    match upload_content(&client, Path::new(path.trim())).await {
                        Ok(content) => content,
                        Err(error) => {
                            println!("  ✗ {error:#}");
                            continue;
                        }
                    }
                } else {
                    Content::Text(line)
                };
                match chat.send_content(peer, &content).await {
                    Ok(client_msg_id) => display.note_send(client_msg_id, peer, content.summary()),
                    Err(error) => break Err(error.into()),
                }
            }
            _ = tokio::signal::ctrl_c() => break Ok(()),
        }
    };
    chat.close().await?;
    // Show what the close flushed (single ticks of the last sends).
    while let Some(event) = events.try_recv() {
        if display.handle(&chat, event).await? == Flow::Stop {
            break;
        }
    }
    result
}

async fn upload_content(client: &BluetickClient, file: &Path) -> Result<Content> {
    let uploaded = upload_with_bar(client, file).await?;
    Ok(Content::Media {
        sha256: uploaded.sha256,
        size: uploaded.size,
        mime: render::guess_mime(file).to_string(),
        name: file
            .file_name()
            .map(|name| name.to_string_lossy().into_owned()),
        caption: None,
    })
}

async fn read(profile: &Profile) -> Result<()> {
    let client = client_for(profile)?;
    let config = ChatConfig {
        // Receipts stay on the server for `listen` to show.
        auto_confirm_receipts: false,
        ..ChatConfig::default()
    };
    let (chat, mut events) = client.open_chat(config).await?;
    let mut inbox = profile.load_inbox()?;
    let deadline = tokio::time::Instant::now() + BACKLOG_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match events.next_event(left).await {
            Ok(ChatEvent::Message(message)) => {
                inbox.add(crate::profile::StoredMessage::from_inbound(&message));
                profile.save_inbox(&inbox)?;
            }
            Ok(ChatEvent::BacklogDone { .. }) => break,
            Ok(ChatEvent::Closed { error_opt }) => {
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
    let ids: Vec<u64> = inbox.messages.keys().copied().collect();
    if !ids.is_empty() {
        chat.mark_read(ids.clone()).await?;
    }
    chat.close().await?;
    inbox.remove(&ids);
    profile.save_inbox(&inbox)?;
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
