//! The few manifest shapes a pull reads: image manifests and indexes, OCI
//! and Docker media types alike (their JSON is the same where we look).

use std::{collections::BTreeMap, fmt, str::FromStr};

use serde::{Deserialize, Serialize};

pub(super) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(super) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(super) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What a client that reads all four asks for.
pub(super) const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// The OCI layout annotation naming an image by tag.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not JSON of a known shape: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported manifest media type {0:?} (schema 1 manifests are not supported)")]
    MediaType(String),
    #[error("bad platform {0:?}: expected os/arch[/variant], e.g. linux/amd64")]
    Platform(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// This machine's platform, in Go's names (what registries use).
    pub fn host() -> Self {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", None),
            "x86" => ("386", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Self {
            os: std::env::consts::OS.to_string(),
            architecture: architecture.to_string(),
            variant: variant.map(str::to_string),
        }
    }

    /// Whether an index entry for `other` serves a client that wants `self`.
    /// A variant is compared only when both name one; arm64's default is v8.
    pub fn matches(&self, other: &Platform) -> bool {
        let norm = |p: &Platform| match (p.architecture.as_str(), p.variant.as_deref()) {
            ("arm64", Some("v8")) => None,
            (_, v) => v.map(str::to_string),
        };
        self.os == other.os
            && self.architecture == other.architecture
            && match (norm(self), norm(other)) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    /// Attestation manifests in an index carry `unknown/unknown`.
    pub fn is_unknown(&self) -> bool {
        self.os == "unknown" || self.architecture == "unknown"
    }
}

impl FromStr for Platform {
    type Err = ManifestError;

    fn from_str(s: &str) -> Result<Self, ManifestError> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &&str| !p.is_empty();
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Self {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => Ok(Self {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(ManifestError::Platform(s.to_string())),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

impl ImageManifest {
    /// Config first, then layers: every blob a pull downloads.
    pub fn blobs(&self) -> impl Iterator<Item = &Descriptor> {
        std::iter::once(&self.config).chain(&self.layers)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

impl ImageIndex {
    /// The entry for `want`, skipping attestations.
    pub fn select(&self, want: &Platform) -> Option<&Descriptor> {
        self.manifests
            .iter()
            .find(|d| d.platform.as_ref().is_some_and(|p| want.matches(p)))
    }

    /// Every runnable image in the index (attestations left out).
    pub fn images(&self) -> impl Iterator<Item = &Descriptor> {
        self.manifests
            .iter()
            .filter(|d| !d.platform.as_ref().is_some_and(Platform::is_unknown))
    }

    pub fn platforms(&self) -> Vec<String> {
        self.images()
            .filter_map(|d| d.platform.as_ref().map(ToString::to_string))
            .collect()
    }
}

#[derive(Debug, Clone)]
pub enum Manifest {
    Image(ImageManifest),
    Index(ImageIndex),
}

impl Manifest {
    /// By the response's `Content-Type`, else by the document's own
    /// `mediaType`, else by its shape (some registries send neither).
    pub fn parse(
        content_type: Option<&str>,
        bytes: &[u8],
    ) -> Result<(String, Self), ManifestError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
        }
        let content_type = content_type
            .map(|c| c.split(';').next().unwrap_or(c).trim().to_string())
            .filter(|c| !c.is_empty() && c != "application/json" && c != "text/plain");
        let probe: Probe = serde_json::from_slice(bytes)?;
        let media_type = match content_type.or(probe.media_type) {
            Some(m) => m,
            None if probe.manifests.is_some() => OCI_INDEX.to_string(),
            None => OCI_MANIFEST.to_string(),
        };
        let parsed = match media_type.as_str() {
            OCI_INDEX | DOCKER_LIST => Self::Index(serde_json::from_slice(bytes)?),
            OCI_MANIFEST | DOCKER_MANIFEST => Self::Image(serde_json::from_slice(bytes)?),
            other => return Err(ManifestError::MediaType(other.to_string())),
        };
        Ok((media_type, parsed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDEX: &str = r#"{
      "schemaVersion": 2,
      "mediaType": "application/vnd.oci.image.index.v1+json",
      "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:aa", "size": 10,
         "platform": {"architecture": "amd64", "os": "linux"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:bb", "size": 11,
         "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:cc", "size": 12,
         "platform": {"architecture": "unknown", "os": "unknown"},
         "annotations": {"vnd.docker.reference.type": "attestation-manifest"}}
      ]
    }"#;

    #[test]
    fn indexes_select_a_platform_and_skip_attestations() {
        let (mt, m) = Manifest::parse(None, INDEX.as_bytes()).unwrap();
        assert_eq!(mt, OCI_INDEX);
        let Manifest::Index(i) = m else { panic!() };
        let pick = |p: &str| i.select(&p.parse().unwrap()).map(|d| d.digest.clone());
        assert_eq!(pick("linux/amd64").as_deref(), Some("sha256:aa"));
        assert_eq!(pick("linux/arm64").as_deref(), Some("sha256:bb"));
        assert_eq!(pick("linux/arm64/v8").as_deref(), Some("sha256:bb"));
        assert_eq!(pick("linux/s390x"), None);
        assert_eq!(i.platforms(), ["linux/amd64", "linux/arm64/v8"]);
    }

    #[test]
    fn docker_manifests_by_content_type_and_by_shape() {
        let doc = r#"{"schemaVersion":2,
          "config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:c","size":3},
          "layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"sha256:l","size":7}]}"#;
        let (mt, m) = Manifest::parse(
            Some(&format!("{DOCKER_MANIFEST}; charset=utf-8")),
            doc.as_bytes(),
        )
        .unwrap();
        assert_eq!(mt, DOCKER_MANIFEST);
        let Manifest::Image(im) = m else { panic!() };
        let blobs: Vec<_> = im.blobs().map(|d| d.digest.as_str()).collect();
        assert_eq!(blobs, ["sha256:c", "sha256:l"]);
        let (mt, _) = Manifest::parse(Some("application/json"), doc.as_bytes()).unwrap();
        assert_eq!(mt, OCI_MANIFEST);
        assert!(matches!(
            Manifest::parse(
                Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
                doc.as_bytes()
            ),
            Err(ManifestError::MediaType(_))
        ));
    }

    #[test]
    fn platforms_parse_and_print() {
        let p: Platform = "linux/arm/v7".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm/v7");
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
        assert!(Platform::host().matches(&Platform::host()));
    }
}
