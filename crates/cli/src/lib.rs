//! `bluetick`, the command-line client: clap subcommands over `bluetick-client`.
//!
//! State lives per profile under `BLUETICK_HOME` (default `~/.bluetick`), see [`profile`].
//! Output is for humans; [`render`] formats ticks, times and message lines, [`commands`]
//! runs each subcommand.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::Duration;

use bluetick_client::{ClientError, DEFAULT_GATEWAY_URL, DEFAULT_MEDIA_URL};
use clap::{Parser, Subcommand, ValueEnum};

pub mod commands;
mod display;
pub mod profile;
pub mod render;

/// bluetick from the command line: register, chat with ticks, presence and media, all
/// end-to-end encrypted.
#[derive(Debug, Parser)]
#[command(name = "bluetick", version, about)]
pub struct Cli {
    /// Profile to use: one device's credentials and local inbox.
    #[arg(
        long,
        global = true,
        env = "BLUETICK_PROFILE",
        default_value = "default"
    )]
    pub profile: String,
    /// Folder holding the profiles [default: ~/.bluetick].
    #[arg(long, global = true, env = "BLUETICK_HOME")]
    pub home: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a user and save its first device in the profile.
    Register {
        /// The handle: 3 to 32 of a-z, 0-9, '_', '.', '-'.
        user: String,
        /// Name shown to others.
        #[arg(long)]
        name: Option<String>,
        /// Gateway endpoint.
        #[arg(long, env = "BLUETICK_SERVER", default_value = DEFAULT_GATEWAY_URL)]
        server: String,
        /// Media endpoint.
        #[arg(long, env = "BLUETICK_MEDIA", default_value = DEFAULT_MEDIA_URL)]
        media: String,
        /// Replace the profile's existing credentials.
        #[arg(long)]
        force: bool,
    },
    /// Add a device to this profile's user and save it as another profile.
    AddDevice {
        /// The profile to create for the new device.
        new_profile: String,
    },
    /// Show this profile's user, device and endpoints.
    Whoami,
    /// List a user's devices (yours by default).
    Devices {
        /// The user.
        user: Option<String>,
    },
    /// Send a text message; prints ✓ when stored and waits briefly for ✓✓ / blue ticks.
    Send {
        /// The recipient.
        user: String,
        /// The text (several words are joined with spaces).
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
        /// Seconds to wait for delivered/read ticks after the single tick.
        #[arg(long, default_value = "2", value_parser = parse_seconds)]
        wait: Duration,
    },
    /// Print incoming messages and ticks of your messages as they arrive (Ctrl-C stops).
    Listen {
        /// Mark displayed messages as read (blue ticks for the sender).
        #[arg(long)]
        read: bool,
        /// Download received media into this folder.
        #[arg(long)]
        save_dir: Option<PathBuf>,
    },
    /// Chat with a user: lines you type are sent; their messages show up and are marked read.
    Chat {
        /// The other user.
        user: String,
        /// Download received media into this folder.
        #[arg(long)]
        save_dir: Option<PathBuf>,
    },
    /// Print unread messages, mark them read and exit.
    Read,
    /// Show when a user was last online.
    LastSeen {
        /// The user.
        user: String,
    },
    /// Follow users' presence live (Ctrl-C stops).
    Watch {
        /// The users.
        #[arg(required = true, num_args = 1..)]
        users: Vec<String>,
    },
    /// Choose who may see your last seen and online state.
    Privacy {
        /// Who may see it.
        visibility: Visibility,
    },
    /// Replace your contact list (used by `privacy contacts`); no users clears it.
    Contacts {
        /// The contacts.
        users: Vec<String>,
    },
    /// Upload a file to the media service unencrypted and print its SHA-256 (send-photo and
    /// /photo encrypt).
    Upload {
        /// The file.
        file: PathBuf,
    },
    /// Download a media blob by SHA-256, verifying it (and decrypting it when it came in an
    /// encrypted message).
    Download {
        /// The blob's SHA-256 (hex).
        sha256: String,
        /// Where to write it.
        out: PathBuf,
    },
    /// Show the safety number you and a user compare to rule out a key swap (and warn about
    /// changed identity keys).
    SafetyNumber {
        /// The other user.
        user: String,
    },
    /// Upload a photo (or any file) and send it as a media message.
    SendPhoto {
        /// The recipient.
        user: String,
        /// The file.
        file: PathBuf,
        /// A caption.
        #[arg(long)]
        caption: Option<String>,
        /// MIME type [default: guessed from the extension].
        #[arg(long)]
        mime: Option<String>,
        /// Seconds to wait for delivered/read ticks after the single tick.
        #[arg(long, default_value = "2", value_parser = parse_seconds)]
        wait: Duration,
    },
}

/// Who may see last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Visibility {
    /// Everyone.
    Everyone,
    /// Only your contacts.
    Contacts,
    /// Nobody.
    Nobody,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{text:?} is not a valid duration"))
}

/// Logs to stderr when `RUST_LOG` is set (the SDK logs with `tracing`).
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// Returns an error as one line, with a hint for the common cases.
pub fn describe_error(error: &anyhow::Error) -> String {
    let text = format!("{error:#}");
    match error.downcast_ref::<ClientError>() {
        Some(ClientError::Unavailable(_)) => {
            format!("{text}\n  is the server running? (`cargo run -p bluetick-dev`)")
        }
        Some(ClientError::Unauthenticated(_)) => {
            format!(
                "{text}\n  the profile's token was refused; register again or pick another --profile"
            )
        }
        _ => text,
    }
}

/// Runs a parsed command line.
///
/// # Errors
/// Whatever the command hit, ready to print.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let home = profile::home_dir(cli.home)?;
    let profile = profile::Profile::new(&home, &cli.profile)?;
    commands::run(profile, cli.command).await
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn send_joins_words_and_parses_wait() {
        let cli = Cli::try_parse_from([
            "bluetick",
            "--profile",
            "bob",
            "send",
            "alice",
            "hello",
            "there",
            "--wait",
            "0.5",
        ])
        .unwrap();
        assert_eq!(cli.profile, "bob");
        match cli.command {
            Command::Send { user, text, wait } => {
                assert_eq!(user, "alice");
                assert_eq!(text.join(" "), "hello there");
                assert_eq!(wait, Duration::from_millis(500));
            }
            other => panic!("parsed {other:?}"),
        }
        assert!(Cli::try_parse_from(["bluetick", "send", "alice", "x", "--wait", "soon"]).is_err());
        assert!(Cli::try_parse_from(["bluetick", "privacy", "friends"]).is_err());
    }
}
