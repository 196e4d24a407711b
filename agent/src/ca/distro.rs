//! Which distro a host root holds, and how its trust store is changed.
//!
//! Read from the host's os-release (`ID`, then each `ID_LIKE`), with the
//! distros' marker files as a fallback for a root without one (old hosts,
//! stand-in roots in tests).

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// A trust store `damselfly ca install` knows how to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Debian, Ubuntu and derivatives: `update-ca-certificates`.
    Debian,
    /// Alpine: its own `update-ca-certificates`, Debian's paths.
    Alpine,
    /// RHEL, CentOS, Fedora, Rocky, Alma, Amazon Linux, Oracle Linux, Azure
    /// Linux: `update-ca-trust extract` (p11-kit).
    Rhel,
    /// SLES, openSUSE: `update-ca-certificates` with anchors under /etc/pki/trust.
    Suse,
    /// Flatcar: a `*.pem` in /etc/ssl/certs, then `update-ca-certificates`
    /// (c_rehash, and the bundle rebuilt from the hash links).
    Flatcar,
}

impl Family {
    /// For messages.
    pub fn name(self) -> &'static str {
        match self {
            Family::Debian => "Debian/Ubuntu",
            Family::Alpine => "Alpine",
            Family::Rhel => "RHEL family",
            Family::Suse => "SUSE",
            Family::Flatcar => "Flatcar",
        }
    }

    /// Where the CA file goes, relative to the host root.
    pub fn anchor_dir(self) -> &'static str {
        match self {
            Family::Debian | Family::Alpine => "usr/local/share/ca-certificates",
            Family::Rhel => "etc/pki/ca-trust/source/anchors",
            Family::Suse => "etc/pki/trust/anchors",
            Family::Flatcar => "etc/ssl/certs",
        }
    }

    /// The CA file's name: Debian's tool takes only `*.crt` there,
    /// Flatcar's documented form is `*.pem`.
    pub fn anchor_name(self) -> &'static str {
        match self {
            Family::Flatcar => "damselfly-node-ca.pem",
            _ => super::trust::ANCHOR_NAME,
        }
    }

    pub fn update_argv(self) -> &'static [&'static str] {
        match self {
            Family::Rhel => &["update-ca-trust", "extract"],
            _ => &["update-ca-certificates"],
        }
    }

    /// The bundle the update writes and TLS clients (containerd among them)
    /// read, relative to the host root: where the CA must show up.
    pub fn bundle(self) -> &'static str {
        match self {
            Family::Debian | Family::Alpine | Family::Flatcar => {
                "etc/ssl/certs/ca-certificates.crt"
            }
            Family::Rhel => "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
            Family::Suse => "var/lib/ca-certificates/ca-bundle.pem",
        }
    }
}

/// A distro whose trust store is not changed from inside the host's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refused {
    pub distro: &'static str,
    /// Why, and what to do instead.
    pub advice: &'static str,
}

const BOTTLEROCKET: Refused = Refused {
    distro: "Bottlerocket",
    advice: "its root file system is read-only and its trust store is built from its settings \
             API: add the node CA (`damselfly ca show`) as a trusted bundle with `apiclient set \
             pki.damselfly.data=<base64 of the PEM> pki.damselfly.trusted=true` (or \
             [settings.pki.damselfly] in user data), and run the agent without `ca install`",
};

const TALOS: Refused = Refused {
    distro: "Talos",
    advice: "its root file system is read-only and its trust store comes from the machine \
             configuration: add the node CA (`damselfly ca show`) in a TrustedRootsConfig \
             document (talosctl patch machineconfig), and run the agent without `ca install`",
};

/// What [`detect`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Detected {
    /// A store we change, and how it was recognised (for messages).
    Store {
        family: Family,
        by: String,
    },
    Refused(Refused),
    /// Nothing known: what os-release said, if anything.
    Unknown {
        os_release: String,
    },
}

/// The marker files tried when os-release names nothing known, in order.
pub(super) const MARKERS: &[(&str, Family)] = &[
    ("etc/debian_version", Family::Debian),
    ("etc/alpine-release", Family::Alpine),
    ("etc/pki/trust/anchors", Family::Suse),
    ("usr/sbin/update-ca-certificates", Family::Debian),
    ("etc/redhat-release", Family::Rhel),
    ("usr/bin/update-ca-trust", Family::Rhel),
];

/// The os-release IDs recognised, for messages.
pub(super) const KNOWN_IDS: &str = "debian, ubuntu, alpine, rhel, centos, fedora, rocky, almalinux, \
                             amzn, ol, azurelinux, mariner, sles, sled, suse, opensuse*, \
                             sl-micro, flatcar";

/// Recognise the distro of the host mounted at `root`.
pub(super) fn detect(root: &Path) -> Result<Detected, (PathBuf, io::Error)> {
    let os_release = read_os_release(root)?;
    let summary = match &os_release {
        Some(fields) => {
            let id = field(fields, "ID").unwrap_or_default();
            let like = field(fields, "ID_LIKE").unwrap_or_default();
            for candidate in std::iter::once(id).chain(like.split_whitespace()) {
                match by_id(candidate) {
                    Some(Ok(family)) => {
                        return Ok(Detected::Store {
                            family,
                            by: format!("os-release ID={id} ID_LIKE={like}"),
                        });
                    }
                    Some(Err(refused)) => return Ok(Detected::Refused(refused)),
                    None => {}
                }
            }
            format!("os-release ID={id:?} ID_LIKE={like:?}")
        }
        None => "no etc/os-release or usr/lib/os-release".to_string(),
    };
    for (marker, family) in MARKERS {
        if root.join(marker).exists() {
            return Ok(Detected::Store {
                family: *family,
                by: format!("{marker} ({summary})"),
            });
        }
    }
    Ok(Detected::Unknown {
        os_release: summary,
    })
}

fn by_id(id: &str) -> Option<Result<Family, Refused>> {
    Some(Ok(match id {
        "debian" | "ubuntu" => Family::Debian,
        "alpine" => Family::Alpine,
        "rhel" | "centos" | "fedora" | "rocky" | "almalinux" | "amzn" | "ol" | "azurelinux"
        | "mariner" => Family::Rhel,
        "sles" | "sled" | "suse" | "sl-micro" => Family::Suse,
        id if id.starts_with("opensuse") => Family::Suse,
        "flatcar" => Family::Flatcar,
        "bottlerocket" => return Some(Err(BOTTLEROCKET)),
        "talos" => return Some(Err(TALOS)),
        _ => return None,
    }))
}

/// The host's os-release as `(key, value)` pairs: `etc/os-release`, else
/// `usr/lib/os-release` (the os-release(5) order); `None` if neither exists.
fn read_os_release(root: &Path) -> Result<Option<Fields>, (PathBuf, io::Error)> {
    for rel in ["etc/os-release", "usr/lib/os-release"] {
        let path = in_root(root, rel);
        match fs::read_to_string(&path) {
            Ok(text) => return Ok(Some(parse_os_release(&text))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err((path, e)),
        }
    }
    Ok(None)
}

/// `root/rel`, following one symbolic link in the host's terms: etc/os-release
/// is usually a link, and an absolute target means the host's /, not ours.
fn in_root(root: &Path, rel: &str) -> PathBuf {
    let path = root.join(rel);
    match fs::read_link(&path) {
        Ok(target) if target.is_absolute() => {
            root.join(target.strip_prefix("/").unwrap_or(&target))
        }
        _ => path,
    }
}

/// os-release's `(key, value)` pairs, in file order.
type Fields = Vec<(String, String)>;

/// `KEY=value` lines; values may be quoted (os-release(5) is shell-like).
pub(super) fn parse_os_release(text: &str) -> Fields {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), unquote(v.trim())))
        .collect()
}

fn unquote(v: &str) -> String {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return if q == '"' {
                inner.replace("\\\"", "\"").replace("\\\\", "\\")
            } else {
                inner.to_string()
            };
        }
    }
    v.to_string()
}

fn field<'a>(fields: &'a [(String, String)], key: &str) -> Option<&'a str> {
    fields
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_values_are_unquoted_and_comments_skipped() {
        let f = parse_os_release(
            "# a comment\n\nNAME=\"Fedora \\\"CoreOS\\\"\"\nID=fedora\nID_LIKE='rhel centos'\nBAD LINE\n",
        );
        assert_eq!(field(&f, "NAME"), Some("Fedora \"CoreOS\""));
        assert_eq!(field(&f, "ID"), Some("fedora"));
        assert_eq!(field(&f, "ID_LIKE"), Some("rhel centos"));
        assert_eq!(field(&f, "VERSION_ID"), None);
        assert_eq!(by_id("opensuse-tumbleweed"), Some(Ok(Family::Suse)));
        assert_eq!(by_id("gentoo"), None);
    }
}
