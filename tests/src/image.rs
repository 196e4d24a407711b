//! Images built offline and pushed to an [`Origin`]: an OCI image layout
//! written by hand (layers of seeded random bytes, gzip'd tars), then
//! `skopeo copy oci:... docker://...` run inside the origin's node.

use std::{
    fs,
    io::{self, Read, Write},
    path::{Path, PathBuf},
};

use flate2::{Compression, write::GzEncoder};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{body, origin::Origin, testbed::Testbed, tools};

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// An OCI image layout on disk.
#[derive(Clone, Debug)]
pub struct Layout {
    pub dir: PathBuf,
    pub tag: String,
    pub manifest_digest: String,
    pub manifest_size: u64,
    pub config: (String, u64),
    /// `(digest, compressed size)` of each layer, bottom first.
    pub layers: Vec<(String, u64)>,
}

/// An image pushed to a registry.
#[derive(Clone, Debug)]
pub struct Image {
    /// `host/repo:tag`.
    pub reference: String,
    pub repo: String,
    pub tag: String,
    pub manifest_digest: String,
    pub config_digest: String,
    /// `(digest, size)` of each layer blob.
    pub layers: Vec<(String, u64)>,
    /// Config plus layer blobs (what a pull downloads besides the manifest).
    pub total_blob_bytes: u64,
    pub layout: Layout,
}

/// What a runtime reports for a pulled reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pulled {
    /// The image id, `sha256:<config digest>`.
    pub config_digest: String,
    /// The digest of the manifest it pulled.
    pub manifest_digest: String,
}

impl Image {
    /// What a runtime that pulled this image reports for it.
    pub fn pulled(&self) -> Pulled {
        Pulled {
            config_digest: self.config_digest.clone(),
            manifest_digest: self.manifest_digest.clone(),
        }
    }

    /// Build an image with one layer per entry of `layer_sizes` (each a file
    /// of that many seeded random bytes) and push it to `origin` as
    /// `repo:tag`. The same `seed` and sizes give the same digests.
    pub fn build_and_push(
        tb: &Testbed,
        origin: &Origin,
        repo: &str,
        tag: &str,
        layer_sizes: &[u64],
        seed: u64,
    ) -> anyhow::Result<Self> {
        let dir = tb
            .dir
            .join(format!("oci-{}-{tag}-{seed}", repo.replace('/', "_")));
        let layout = build_layout(&dir, tag, layer_sizes, seed)?;
        push(tb, origin, &layout, repo, tag)
    }

    /// Sum of the layer blob sizes.
    pub fn layer_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.1).sum()
    }

    /// The image's blobs: config first, then the layers.
    pub fn blob_digests(&self) -> Vec<String> {
        std::iter::once(self.config_digest.clone())
            .chain(self.layers.iter().map(|l| l.0.clone()))
            .collect()
    }

    /// `host/repo@sha256:...`.
    pub fn digest_reference(&self) -> String {
        let host = self.reference.split('/').next().unwrap_or_default();
        format!("{host}/{}@{}", self.repo, self.manifest_digest)
    }
}

/// Push an OCI layout to `origin` with skopeo, run inside the origin's node
/// (no agent there, and its /etc/hosts knows the name).
pub fn push(
    tb: &Testbed,
    origin: &Origin,
    layout: &Layout,
    repo: &str,
    tag: &str,
) -> anyhow::Result<Image> {
    let reference = origin.reference(repo, tag);
    let mut cmd = tools::skopeo(&origin.node, &tb.dir.join("skopeo-tmp"))?;
    tools::isolate_env(&mut cmd, &origin.ca_pem, &origin.ca_dir);
    cmd.args(["--insecure-policy", "copy", "--quiet", "--dest-cert-dir"])
        .arg(&origin.ca_dir);
    if let Some((u, p)) = origin.creds() {
        cmd.args(["--dest-creds", &format!("{u}:{p}")]);
    }
    if !origin.tls {
        cmd.arg("--dest-tls-verify=false");
    }
    cmd.arg(format!("oci:{}:{}", layout.dir.display(), layout.tag))
        .arg(format!("docker://{reference}"));
    tools::run(&mut cmd)?;
    Ok(Image {
        reference,
        repo: repo.to_string(),
        tag: tag.to_string(),
        manifest_digest: layout.manifest_digest.clone(),
        config_digest: layout.config.0.clone(),
        layers: layout.layers.clone(),
        total_blob_bytes: layout.config.1 + layout.layers.iter().map(|l| l.1).sum::<u64>(),
        layout: layout.clone(),
    })
}

/// Write an OCI image layout into `dir` (created): one layer per size, each
/// a gzip'd tar holding `layer<i>.bin` of seeded random bytes, a config for
/// this machine's platform, a manifest, and index.json naming it `tag`.
pub fn build_layout(
    dir: &Path,
    tag: &str,
    layer_sizes: &[u64],
    seed: u64,
) -> anyhow::Result<Layout> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;

    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, &size) in layer_sizes.iter().enumerate() {
        let (digest, len, diff_id) = write_layer(&blobs, i, size, seed)?;
        layers.push((digest, len));
        diff_ids.push(diff_id);
    }
    let config = serde_json::to_vec(&json!({
        "architecture": go_arch(),
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": layer_sizes.iter().enumerate()
            .map(|(i, s)| json!({ "created_by": format!("dfly testbed: layer {i}, {s} bytes, seed {seed}") }))
            .collect::<Vec<_>>(),
    }))?;
    let config_desc = write_blob(&blobs, &config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": config_desc.0, "size": config_desc.1 },
        "layers": layers.iter()
            .map(|(d, s)| json!({ "mediaType": LAYER_MEDIA_TYPE, "digest": d, "size": s }))
            .collect::<Vec<_>>(),
    }))?;
    let (manifest_digest, manifest_size) = write_blob(&blobs, &manifest)?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(Layout {
        dir: dir.to_path_buf(),
        tag: tag.to_string(),
        manifest_digest,
        manifest_size,
        config: config_desc,
        layers,
    })
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn write_blob(blobs: &Path, data: &[u8]) -> anyhow::Result<(String, u64)> {
    let hex = body::hex(&Sha256::digest(data));
    fs::write(blobs.join(&hex), data)?;
    Ok((format!("sha256:{hex}"), data.len() as u64))
}

/// Returns (digest of the gzip blob, its size, diff_id of the tar).
fn write_layer(
    blobs: &Path,
    index: usize,
    size: u64,
    seed: u64,
) -> anyhow::Result<(String, u64, String)> {
    let tmp = blobs.join(format!(".layer{index}.tmp"));
    let file = io::BufWriter::new(fs::File::create(&tmp)?);
    // Level 0 (stored deflate blocks): random data does not compress anyway,
    // and in the unoptimized test profile miniz at level 1 takes ~5 s per
    // 100 MB where stored blocks cost next to nothing. Still a valid gzip
    // that every client decompresses.
    let gz = GzEncoder::new(HashWriter::new(file), Compression::none());
    let mut tar = tar::Builder::new(HashWriter::new(gz));
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    let file_seed = seed.wrapping_mul(1000).wrapping_add(index as u64);
    tar.append_data(
        &mut header,
        format!("layer{index}.bin"),
        SeededReader {
            seed: file_seed,
            pos: 0,
            len: size,
        },
    )?;
    let tar_hw = tar.into_inner()?;
    let diff_id = format!("sha256:{}", body::hex(&tar_hw.hasher.finalize()));
    let gz_hw = tar_hw.inner.finish()?;
    let len = gz_hw.len;
    let digest = body::hex(&gz_hw.hasher.finalize());
    let mut file = gz_hw.inner;
    file.flush()?;
    drop(file);
    fs::rename(&tmp, blobs.join(&digest))?;
    Ok((format!("sha256:{digest}"), len, diff_id))
}

struct SeededReader {
    seed: u64,
    pos: u64,
    len: u64,
}

impl Read for SeededReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.len - self.pos).min(buf.len() as u64) as usize;
        body::fill(self.seed, self.pos, &mut buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W> HashWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_deterministic_and_self_consistent() {
        let base = std::env::temp_dir().join(format!("dfly-{}-unit-image", std::process::id()));
        let a = build_layout(&base.join("a"), "t", &[1000, 70_000], 5).unwrap();
        let b = build_layout(&base.join("b"), "t", &[1000, 70_000], 5).unwrap();
        let c = build_layout(&base.join("c"), "t", &[1000, 70_000], 6).unwrap();
        assert_eq!(a.manifest_digest, b.manifest_digest);
        assert_ne!(a.manifest_digest, c.manifest_digest);
        assert_ne!(a.layers[0].0, a.layers[1].0);
        for (d, s) in a.layers.iter().chain([&a.config]) {
            let data = fs::read(a.dir.join("blobs/sha256").join(&d[7..])).unwrap();
            assert_eq!(data.len() as u64, *s);
            assert_eq!(format!("sha256:{}", body::hex(&Sha256::digest(&data))), *d);
        }
        // The layer really is a tar.gz holding the file.
        let f = fs::File::open(a.dir.join("blobs/sha256").join(&a.layers[1].0[7..])).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
        let mut e = ar.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.path().unwrap().to_str(), Some("layer1.bin"));
        let mut content = Vec::new();
        e.read_to_end(&mut content).unwrap();
        assert_eq!(content.len(), 70_000);
        fs::remove_dir_all(&base).unwrap();
    }
}
