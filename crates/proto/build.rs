//! Compiles every `.proto` under the workspace's `proto/` with protox (no system protoc) and
//! writes the descriptor set used by gRPC reflection and `grpcurl -protoset`.

use std::path::PathBuf;

use prost::Message;
use tonic_prost_build::FileDescriptorSet;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build-script binary reused from a checkout at another path must
    // not compile that checkout's protos.
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "bluetick/common/v1/common.proto",
        "bluetick/gateway/v1/accounts.proto",
        "bluetick/gateway/v1/keys.proto",
        "bluetick/gateway/v1/chat.proto",
        "bluetick/gateway/v1/presence.proto",
        "bluetick/gateway/v1/internal.proto",
        "bluetick/messaging/v1/messaging.proto",
        "bluetick/ack/v1/ack.proto",
        "bluetick/presence/v1/presence.proto",
        "bluetick/media/v1/media.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
    }
    let descriptor_set = protox::compile(files, [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("bluetick_descriptor.bin"),
        descriptor_set.encode_to_vec(),
    )?;
    // Chat frames and internal calls are small: they use a codec whose buffers start at
    // 256 bytes instead of tonic's 8 KiB per direction and call (see `codec.rs`). Media moves
    // large chunks and keeps tonic's default.
    // media.proto imports nothing, so the compiled set splits cleanly by file.
    let (media, small): (Vec<_>, Vec<_>) = descriptor_set
        .file
        .into_iter()
        .partition(|file| file.name().starts_with("bluetick/media/"));
    tonic_prost_build::configure()
        .bytes(".")
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(FileDescriptorSet { file: small })?;
    tonic_prost_build::configure()
        .bytes(".")
        .compile_fds(FileDescriptorSet { file: media })?;
    Ok(())
}
