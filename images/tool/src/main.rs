//! `capsid-image`: builds the guest initramfs and rootfs images (used by the
//! project's scripts; the shim and CLI call the library directly).

use std::path::PathBuf;

use anyhow::Context;
use capsid_images::rootfs::{self, Format};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// Writes the guest initramfs with AGENT as /init; prints its size.
    Initramfs {
        #[arg(long)]
        agent: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Converts a rootfs directory to a block image (cached by content);
    /// prints the image's path.
    Rootfs {
        dir: PathBuf,
        /// erofs or ext4 (default: erofs when mkfs.erofs is installed).
        #[arg(long)]
        format: Option<String>,
        /// Cache directory (default $CAPSID_CACHE or /var/cache/capsid).
        #[arg(long)]
        cache: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Verb::Initramfs { agent, out } => {
            let size = capsid_images::agent_initramfs(&agent, &out)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("{size}");
        }
        Verb::Rootfs { dir, format, cache } => {
            let format = match format.as_deref() {
                None => None,
                Some("erofs") => Some(Format::Erofs),
                Some("ext4") => Some(Format::Ext4),
                Some(other) => anyhow::bail!("--format {other}: use erofs or ext4"),
            };
            let cache = cache.unwrap_or_else(capsid_images::cache_dir);
            let image = rootfs::image(&dir, format, &cache)?;
            println!("{}", image.path.display());
        }
    }
    Ok(())
}
