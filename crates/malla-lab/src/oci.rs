//! OCI image archives made by hand, with no registry and no image builder: one layer (a
//! directory tarred with fixed owners and times), the image config, the manifest and an index
//! naming the image, packed as an `oci-archive` that `ctr images import` loads. The lab's pause
//! image ([`crate::kubelet`]) and the tests' busybox image are made this way.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// Go's name of this machine's architecture (what an image config's `architecture` says).
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// `tar --numeric-owner --owner=0 --group=0 OPTS -C FROM -cf TO FILES`.
fn tar(opts: &[&str], from: &Path, to: &Path, files: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0"])
        .args(opts)
        .arg("-C")
        .arg(from)
        .arg("-cf")
        .arg(to)
        .args(files)
        .output()
        .context("running tar")?;
    if !out.status.success() {
        bail!(
            "tar -C {} -cf {}: {}",
            from.display(),
            to.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Stores `file` as a blob of the OCI layout `oci`; returns its digest and size.
fn add_blob(oci: &Path, file: &Path) -> anyhow::Result<(String, u64)> {
    let out = Command::new("sha256sum")
        .arg(file)
        .output()
        .context("running sha256sum")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(hex) = text
        .split_whitespace()
        .next()
        .filter(|_| out.status.success())
    else {
        bail!("sha256sum {}: no digest", file.display());
    };
    let size = std::fs::metadata(file)?.len();
    std::fs::copy(file, oci.join("blobs/sha256").join(hex))
        .with_context(|| format!("copying {} into the OCI layout", file.display()))?;
    Ok((format!("sha256:{hex}"), size))
}

fn write_json(path: &Path, v: &Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_vec(v)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Packs `rootfs` as a one-layer image named `name` (e.g. `localhost/malla-pause:1.0`) whose
/// runtime config is `config` (`Entrypoint`, `Cmd`, `Env`, …) into the archive `out`, using
/// `work` (created) for the intermediate files. Times are 0 and owners root: the same input
/// gives the same archive.
pub fn write_archive(
    work: &Path,
    rootfs: &Path,
    name: &str,
    config: Value,
    out: &Path,
) -> anyhow::Result<PathBuf> {
    let oci = work.join("oci");
    std::fs::create_dir_all(oci.join("blobs/sha256"))
        .with_context(|| format!("creating {}", oci.display()))?;
    let layer = work.join("layer.tar");
    tar(&["--sort=name", "--mtime=@0"], rootfs, &layer, &["."])?;
    let (layer_digest, layer_size) = add_blob(&oci, &layer)?;
    let config_file = work.join("config.json");
    write_json(
        &config_file,
        &json!({
            "architecture": go_arch(),
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }),
    )?;
    let (config_digest, config_size) = add_blob(&oci, &config_file)?;
    let manifest_file = work.join("manifest.json");
    write_json(
        &manifest_file,
        &json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest, "size": layer_size}],
        }),
    )?;
    let (manifest_digest, manifest_size) = add_blob(&oci, &manifest_file)?;
    write_json(
        &oci.join("index.json"),
        &json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": manifest_digest, "size": manifest_size,
                           "annotations": {"org.opencontainers.image.ref.name": name,
                                           "io.containerd.image.name": name}}],
        }),
    )?;
    std::fs::write(oci.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    tar(&[], &oci, out, &["oci-layout", "index.json", "blobs"])?;
    Ok(out.to_path_buf())
}
