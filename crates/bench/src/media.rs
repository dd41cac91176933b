//! The `media` scenario: one file uploaded and downloaded again through the media service
//! with the SDK (streamed in 1 MiB frames, hashed on both sides), timed each way, while the
//! media server's resident memory is sampled for its peak.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use bluetick_client::{BluetickClient, no_progress, register};
use bytes::Bytes;
use rand::RngCore;
use serde::Serialize;

use crate::procfs;

const MIB: f64 = 1024.0 * 1024.0;

/// What the media scenario measured.
#[derive(Debug, Default, Serialize)]
pub(crate) struct MediaReport {
    pub(crate) scenario: &'static str,
    pub(crate) size_mib: f64,
    pub(crate) upload_seconds: f64,
    pub(crate) upload_mib_per_second: f64,
    pub(crate) download_seconds: f64,
    pub(crate) download_mib_per_second: f64,
    pub(crate) server_pid: Option<u32>,
    pub(crate) server_rss_before_mib: f64,
    pub(crate) server_peak_rss_mib: f64,
    pub(crate) server_cpu_upload_percent: f64,
    pub(crate) server_cpu_download_percent: f64,
    pub(crate) generator_cpu_percent: f64,
}

/// Samples the resident set of `pid` every 10 ms and keeps the largest, until `stop`.
fn spawn_rss_sampler(pid: u32, stop: Arc<AtomicBool>, peak_kib: Arc<AtomicU64>) {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            if let Ok(sample) = procfs::sample(pid) {
                peak_kib.fetch_max(sample.rss_kib, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
}

fn server_cpu(pid_opt: Option<u32>) -> f64 {
    pid_opt
        .and_then(|pid| procfs::sample(pid).ok())
        .map_or(0.0, |sample| sample.cpu_seconds)
}

/// Uploads `size_mib` MiB of random bytes and downloads them again.
///
/// # Errors
/// When registration or a transfer fails, or the download's size differs.
pub(crate) async fn run_media(
    gateway: &str,
    media: &str,
    size_mib: u64,
    server_pid_opt: Option<u32>,
) -> anyhow::Result<MediaReport> {
    let user_id = format!("media{}", rand::random::<u32>());
    let client = BluetickClient::new(register(gateway, media, &user_id, "media").await?)?;
    let size = usize::try_from(size_mib)? * 1024 * 1024;
    let mut data = vec![0u8; size];
    rand::rng().fill_bytes(&mut data);
    let data = Bytes::from(data);

    let before_opt = server_pid_opt.map(procfs::sample).transpose()?;
    let peak_kib = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    if let Some(pid) = server_pid_opt {
        procfs::reset_peak_rss(pid);
        spawn_rss_sampler(pid, stop.clone(), peak_kib.clone());
    }

    let cpu_start = procfs::self_cpu_seconds();
    let server_cpu_start = server_cpu(server_pid_opt);
    let upload_start = Instant::now();
    let uploaded = client.upload_bytes(data, no_progress()).await?;
    let upload_seconds = upload_start.elapsed().as_secs_f64();
    let server_cpu_uploaded = server_cpu(server_pid_opt);

    let download_start = Instant::now();
    let downloaded = client
        .download_to_writer(&uploaded.sha256, &mut tokio::io::sink(), no_progress())
        .await?;
    let download_seconds = download_start.elapsed().as_secs_f64();
    let server_cpu_downloaded = server_cpu(server_pid_opt);
    let generator_cpu = procfs::self_cpu_seconds() - cpu_start;
    stop.store(true, Ordering::Relaxed);
    if downloaded != size as u64 {
        bail!("downloaded {downloaded} bytes of {size}");
    }

    let after_opt = server_pid_opt.map(procfs::sample).transpose()?;
    let peak = after_opt
        .map_or(0, |after| after.peak_rss_kib)
        .max(peak_kib.load(Ordering::Relaxed));
    let size_mib_f = size as f64 / MIB;
    Ok(MediaReport {
        scenario: "media",
        size_mib: size_mib_f,
        upload_seconds,
        upload_mib_per_second: size_mib_f / upload_seconds.max(1e-9),
        download_seconds,
        download_mib_per_second: size_mib_f / download_seconds.max(1e-9),
        server_pid: server_pid_opt,
        server_rss_before_mib: before_opt.map_or(0.0, |before| before.rss_kib as f64 / 1024.0),
        server_peak_rss_mib: peak as f64 / 1024.0,
        server_cpu_upload_percent: 100.0 * (server_cpu_uploaded - server_cpu_start)
            / upload_seconds.max(1e-9),
        server_cpu_download_percent: 100.0 * (server_cpu_downloaded - server_cpu_uploaded)
            / download_seconds.max(1e-9),
        generator_cpu_percent: 100.0 * generator_cpu
            / (upload_seconds + download_seconds).max(1e-9),
    })
}
