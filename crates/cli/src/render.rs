//! Text for humans: ticks, times, message lines. Remote text is sanitized so a message
//! cannot drive the terminal with control sequences.

use std::io::IsTerminal;
use std::time::{SystemTime, UNIX_EPOCH};

use bluetick_client::{Content, TickStatus};

/// Returns `text` with control characters replaced, and later lines indented.
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\n    "),
            '\t' => out.push(' '),
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// Returns the tick marks of a status: `✓`, `✓✓`, or blue `✓✓` (plus "(read)" when
/// colour is off).
pub fn ticks(status: TickStatus, colour: bool) -> String {
    match status {
        TickStatus::Read if colour => "\x1b[34m✓✓\x1b[0m".to_string(),
        TickStatus::Read => "✓✓ (read)".to_string(),
        TickStatus::Delivered => "✓✓".to_string(),
        TickStatus::Sent => "✓".to_string(),
        TickStatus::Unspecified => "?".to_string(),
    }
}

/// Returns true when stdout is a terminal (colour on).
pub fn colour_enabled() -> bool {
    std::env::var_os("NO_COLOR").is_none() && std::io::stdout().is_terminal()
}

/// Returns the current time in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Returns `(year, month, day)` of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Returns `YYYY-MM-DD HH:MM:SS UTC` for milliseconds since the epoch.
pub fn utc_timestamp(ms: u64) -> String {
    let seconds = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let second_of_day = seconds.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        second_of_day / 3600,
        (second_of_day / 60) % 60,
        second_of_day % 60
    )
}

/// Returns `HH:MM:SS` (UTC) for milliseconds since the epoch.
pub fn clock(ms: u64) -> String {
    let second_of_day = (ms / 1000) % 86_400;
    format!(
        "{:02}:{:02}:{:02}",
        second_of_day / 3600,
        (second_of_day / 60) % 60,
        second_of_day % 60
    )
}

/// Returns "just now", "5 min ago", "3 h ago" or "2 days ago" for `then_ms` seen at `now_ms`.
pub fn relative(then_ms: u64, now_ms: u64) -> String {
    let seconds = now_ms.saturating_sub(then_ms) / 1000;
    match seconds {
        0..60 => "just now".to_string(),
        60..3600 => format!("{} min ago", seconds / 60),
        3600..86_400 => format!("{} h ago", seconds / 3600),
        _ => format!("{} days ago", seconds / 86_400),
    }
}

/// Returns the text shown for a payload: the content's summary, or a note for bytes that
/// are not a known content.
pub fn payload_summary(payload: &[u8]) -> String {
    match Content::decode(payload) {
        Ok(content) => sanitize(&content.summary()),
        Err(_) => format!("<{} bytes of unknown content>", payload.len()),
    }
}

/// Returns a file name safe to create in a download folder from an untrusted name: its
/// last component, limited to harmless characters, else `fallback`.
pub fn safe_file_name(untrusted_opt: Option<&str>, fallback: &str) -> String {
    let last_component = untrusted_opt
        .and_then(|name| name.rsplit(['/', '\\']).next())
        .unwrap_or("");
    let cleaned: String = last_component
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '.' | '-' | '_' | ' '))
        .take(100)
        .collect();
    let cleaned = cleaned.trim().trim_start_matches('.').to_string();
    if cleaned.is_empty() {
        fallback.to_string()
    } else {
        cleaned
    }
}

/// Returns a MIME type guessed from a file's extension.
pub fn guess_mime(path: &std::path::Path) -> &'static str {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match extension.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "mp4" => "video/mp4",
        "mov" => "video/quicktime",
        "mp3" => "audio/mpeg",
        "ogg" | "opus" => "audio/ogg",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_reach_the_terminal() {
        assert_eq!(sanitize("hi\x1b[2Jthere"), "hi\u{FFFD}[2Jthere");
        assert_eq!(sanitize("a\nb"), "a\n    b");
        assert_eq!(sanitize("plain ✓"), "plain ✓");
    }

    #[test]
    fn ticks_follow_the_status() {
        assert_eq!(ticks(TickStatus::Sent, false), "✓");
        assert_eq!(ticks(TickStatus::Delivered, false), "✓✓");
        assert_eq!(ticks(TickStatus::Read, false), "✓✓ (read)");
        assert!(ticks(TickStatus::Read, true).contains("\x1b[34m"));
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_timestamp(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_timestamp(1_700_000_000_123), "2023-11-14 22:13:20 UTC");
        assert_eq!(clock(1_700_000_000_123), "22:13:20");
    }

    #[test]
    fn relative_times_read_naturally() {
        let now = 10_000_000_000;
        assert_eq!(relative(now - 5_000, now), "just now");
        assert_eq!(relative(now - 5 * 60_000, now), "5 min ago");
        assert_eq!(relative(now - 3 * 3_600_000, now), "3 h ago");
        assert_eq!(relative(now - 2 * 86_400_000, now), "2 days ago");
        assert_eq!(relative(now + 5_000, now), "just now");
    }

    #[test]
    fn untrusted_file_names_stay_inside_the_folder() {
        assert_eq!(safe_file_name(Some("../../etc/passwd"), "f"), "passwd");
        assert_eq!(safe_file_name(Some("..\\evil.exe"), "f"), "evil.exe");
        assert_eq!(safe_file_name(Some(".."), "fallback"), "fallback");
        assert_eq!(safe_file_name(Some(".bashrc"), "f"), "bashrc");
        assert_eq!(safe_file_name(None, "abc"), "abc");
        assert_eq!(safe_file_name(Some("cat pic.jpg"), "f"), "cat pic.jpg");
    }

    #[test]
    fn payloads_are_summarised() {
        assert_eq!(payload_summary(&Content::text("yo").encode()), "yo");
        assert_eq!(payload_summary(b"\xff\xfe"), "<2 bytes of unknown content>");
        assert_eq!(guess_mime(std::path::Path::new("a/B.JPG")), "image/jpeg");
    }
}
