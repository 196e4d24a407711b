//! Registry patterns -> the DNS subtrees the node CA may vouch for.
//!
//! An X.509 `dNSName` constraint `gcr.io` permits `gcr.io` and every name
//! below it, at any depth; it has no way to say "exactly one label here". So a
//! pattern with `*` widens to the part after its last `*` label (see the
//! module doc of [`crate::ca`] for the default list).

use std::collections::BTreeSet;

/// A pattern has nothing constrainable left after its last `*` label
/// (e.g. `registry.*`): a CA for it would be valid for every name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "registry pattern {0:?} ends in a wildcard label: the node CA cannot be limited to it \
     (use a pattern with a fixed parent domain, e.g. *.example.com)"
)]
pub struct Unconstrainable(pub String);

/// The permitted DNS subtrees for `patterns`: sorted, deduplicated, and
/// without names already covered by a parent in the list.
pub fn permitted_dns_subtrees<S: AsRef<str>>(
    patterns: &[S],
) -> Result<Vec<String>, Unconstrainable> {
    let mut parents = BTreeSet::new();
    for p in patterns {
        parents.insert(subtree_for(p.as_ref())?);
    }
    let all: Vec<String> = parents.into_iter().collect();
    Ok(all
        .iter()
        .filter(|name| !all.iter().any(|parent| is_below(name, parent)))
        .cloned()
        .collect())
}

/// The nearest subtree an X.509 constraint can express for one pattern.
pub(super) fn subtree_for(pattern: &str) -> Result<String, Unconstrainable> {
    let normalized = pattern.trim().trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = normalized.split('.').collect();
    let after_wildcard = match labels.iter().rposition(|l| *l == "*") {
        Some(i) => &labels[i + 1..],
        None => &labels[..],
    };
    if after_wildcard.is_empty() || after_wildcard.iter().any(|l| l.is_empty()) {
        return Err(Unconstrainable(pattern.to_string()));
    }
    Ok(after_wildcard.join("."))
}

/// How `given` subtrees differ from `stored` ones, for messages: e.g.
/// `adds ["r.example.com"]; drops ["quay.io"]`.
pub fn difference(stored: &[String], given: &[String]) -> String {
    let only = |a: &[String], b: &[String]| -> Vec<String> {
        a.iter().filter(|x| !b.contains(x)).cloned().collect()
    };
    let (added, dropped) = (only(given, stored), only(stored, given));
    match (added.is_empty(), dropped.is_empty()) {
        (false, true) => format!("adds {added:?}"),
        (true, false) => format!("drops {dropped:?}"),
        (false, false) => format!("adds {added:?}; drops {dropped:?}"),
        (true, true) => "changes nothing".into(),
    }
}

/// Is `name` strictly below `parent` (at a label boundary)?
fn is_below(name: &str, parent: &str) -> bool {
    name.len() > parent.len()
        && name.ends_with(parent)
        && name.as_bytes()[name.len() - parent.len() - 1] == b'.'
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::origin::RegistryHosts;

    #[test]
    fn wildcards_widen_to_the_part_after_the_last_star() {
        for (pattern, subtree) in [
            ("ghcr.io", "ghcr.io"),
            ("*.gcr.io", "gcr.io"),
            ("*.pkg.dev", "pkg.dev"),
            ("*.dkr.ecr.*.amazonaws.com", "amazonaws.com"),
            ("*.azurecr.io", "azurecr.io"),
            ("Registry.DFLY.test.", "registry.dfly.test"),
            ("*.*.corp.example", "corp.example"),
        ] {
            assert_eq!(subtree_for(pattern).unwrap(), subtree, "{pattern}");
        }
        for bad in ["*", "registry.*", "a.*.*", "", "a..b"] {
            assert!(subtree_for(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn defaults_collapse_to_covering_parents() {
        let r = RegistryHosts::new(&[]).unwrap();
        assert_eq!(
            permitted_dns_subtrees(r.patterns()).unwrap(),
            [
                "amazonaws.com",
                "azurecr.io",
                "docker.io",
                "gcr.io",
                "ghcr.io",
                "mcr.microsoft.com",
                "nvcr.io",
                "pkg.dev",
                "public.ecr.aws",
                "quay.io",
                "registry.k8s.io",
            ]
        );
    }

    #[test]
    fn covered_names_are_dropped_but_siblings_are_not() {
        assert_eq!(
            permitted_dns_subtrees(&[
                "a.example.com",
                "*.example.com",
                "example.com",
                "badexample.com",
                "x.a.example.com",
            ])
            .unwrap(),
            ["badexample.com", "example.com"]
        );
        assert_eq!(
            permitted_dns_subtrees(&["registry.dfly.test", "registry.dfly.test"]).unwrap(),
            ["registry.dfly.test"]
        );
        assert!(permitted_dns_subtrees(&["ghcr.io", "registry.*"]).is_err());
    }

    #[test]
    fn differences_name_what_is_added_and_dropped() {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let stored = v(&["a.io", "b.io"]);
        assert_eq!(
            difference(&stored, &v(&["a.io", "b.io", "c.io"])),
            r#"adds ["c.io"]"#
        );
        assert_eq!(difference(&stored, &v(&["a.io"])), r#"drops ["b.io"]"#);
        assert_eq!(
            difference(&stored, &v(&["a.io", "c.io"])),
            r#"adds ["c.io"]; drops ["b.io"]"#
        );
        assert_eq!(difference(&stored, &stored), "changes nothing");
    }
}
