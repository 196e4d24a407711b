//! Which hosts are registries: the TLS connections to these are terminated
//! (and their blobs cached); every other host is spliced untouched.
//!
//! Patterns are matched label by label; `*` stands for exactly one label, so
//! `*.gcr.io` matches `us.gcr.io` but not `gcr.io` or `a.b.gcr.io`.

use serde::{Deserialize, Serialize};

/// The public registries Damselfly knows without configuration.
pub const DEFAULT_REGISTRIES: &[&str] = &[
    "docker.io",
    "registry-1.docker.io",
    "index.docker.io",
    "ghcr.io",
    "quay.io",
    "registry.k8s.io",
    "gcr.io",
    "*.gcr.io",
    "*.pkg.dev",
    "public.ecr.aws",
    "*.dkr.ecr.*.amazonaws.com",
    "mcr.microsoft.com",
    "*.azurecr.io",
    "nvcr.io",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--registry {0:?}: expected a host name such as registry.example.com or *.example.com")]
pub struct BadPattern(pub String);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryHosts {
    patterns: Vec<String>,
}

impl RegistryHosts {
    /// The defaults plus `extra` (from `--registry`, repeatable).
    pub fn new(extra: &[String]) -> Result<Self, BadPattern> {
        let mut patterns: Vec<String> = DEFAULT_REGISTRIES.iter().map(|s| s.to_string()).collect();
        for p in extra {
            let p = p.trim().trim_end_matches('.').to_ascii_lowercase();
            if !valid_pattern(&p) {
                return Err(BadPattern(p));
            }
            if !patterns.contains(&p) {
                patterns.push(p);
            }
        }
        Ok(Self { patterns })
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// The patterns without a `*`: the hosts a per-registry directory (Docker's
    /// `certs.d/<host>`) can name.
    pub fn exact(&self) -> Vec<&str> {
        self.patterns
            .iter()
            .map(String::as_str)
            .filter(|p| !p.contains('*'))
            .collect()
    }

    /// Is `host` (an SNI, or a Host header with or without `:port`) a registry?
    pub fn contains(&self, host: &str) -> bool {
        let host = strip_port(host).trim_end_matches('.').to_ascii_lowercase();
        self.patterns.iter().any(|p| matches(p, &host))
    }
}

/// `host[:port]` or `[v6]:port` without the port.
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal is never a registry name.
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

fn matches(pattern: &str, host: &str) -> bool {
    let (mut p, mut h) = (pattern.split('.'), host.split('.'));
    loop {
        match (p.next(), h.next()) {
            (None, None) => return true,
            (Some("*"), Some(label)) if !label.is_empty() => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

fn valid_pattern(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 253
        && p.split('.').all(|label| {
            label == "*"
                || (!label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_cover_the_public_registries() {
        let r = RegistryHosts::new(&[]).unwrap();
        for h in [
            "registry-1.docker.io",
            "ghcr.io",
            "us.gcr.io",
            "europe-west1-docker.pkg.dev",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com",
            "myreg.azurecr.io",
            "registry.k8s.io:443",
            "GHCR.IO.",
        ] {
            assert!(r.contains(h), "{h}");
        }
        for h in [
            "example.com",
            "gcr.io.evil.com",
            "a.b.gcr.io",
            "dkr.ecr.us-east-1.amazonaws.com",
            "[::1]:443",
            "",
        ] {
            assert!(!r.contains(h), "{h}");
        }
    }

    #[test]
    fn extra_registries_with_wildcards() {
        let r =
            RegistryHosts::new(&["registry.dfly.test".into(), "*.corp.example".into()]).unwrap();
        assert!(r.contains("registry.dfly.test"));
        assert!(r.contains("registry.dfly.test:5000"));
        assert!(r.contains("hub.corp.example"));
        assert!(!r.contains("corp.example"));
        let exact = r.exact();
        assert!(exact.contains(&"registry.dfly.test") && exact.contains(&"ghcr.io"));
        assert!(!exact.iter().any(|h| h.contains('*')), "{exact:?}");
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["", "a..b", "-a.com", "a b.com", "x/y"] {
            assert!(RegistryHosts::new(&[bad.to_string()]).is_err(), "{bad:?}");
        }
    }
}
