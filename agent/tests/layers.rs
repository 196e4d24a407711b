//! The agent's top-level modules may only import each other along the
//! edges listed here, and the listed graph has no cycle: a new edge fails
//! this test (add it only if the graph stays one-way), and an edge that goes
//! away must be struck from the list. `testing` (helpers for tests, which
//! `pki`'s tests use and which use `pki`) is left out of the cycle check.
//!
//! An edge is a `crate::X` path (single or in a `use crate::{…}` group) in a
//! file of module M, tests included; comments are ignored.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

/// `from -> to`, every top-level import the code makes today.
const ALLOWED: &[(&str, &str)] = &[
    ("admin", "intercept"),
    ("admin", "oci"),
    ("admin", "registry"),
    ("admin", "steer"),
    ("admin", "store"),
    ("admin", "swarm"),
    ("admin", "telemetry"),
    ("admin", "tracker"),
    ("admin", "upstream"),
    ("agent", "admin"),
    ("agent", "ca"),
    ("agent", "cli"),
    ("agent", "intercept"),
    ("agent", "pki"),
    ("agent", "registry"),
    ("agent", "steer"),
    ("agent", "store"),
    ("agent", "swarm"),
    ("agent", "telemetry"),
    ("agent", "tracker"),
    ("agent", "upstream"),
    ("ca", "registry"),
    ("ca", "testing"),
    ("cli", "admin"),
    ("cli", "ca"),
    ("cli", "intercept"),
    ("cli", "oci"),
    ("cli", "pki"),
    ("cli", "registry"),
    ("cli", "steer"),
    ("cli", "store"),
    ("cli", "swarm"),
    ("cli", "telemetry"),
    ("cli", "testing"),
    ("cli", "tracker"),
    ("cli", "upstream"),
    ("intercept", "registry"),
    ("intercept", "steer"),
    ("intercept", "telemetry"),
    ("oci", "registry"),
    ("oci", "store"),
    ("oci", "testing"),
    ("oci", "upstream"),
    ("pki", "testing"),
    ("registry", "store"),
    ("registry", "swarm"),
    ("registry", "telemetry"),
    ("registry", "testing"),
    ("registry", "upstream"),
    ("store", "testing"),
    ("swarm", "pki"),
    ("swarm", "store"),
    ("swarm", "telemetry"),
    ("swarm", "testing"),
    ("swarm", "tracker"),
    ("swarm", "upstream"),
    ("telemetry", "steer"),
    ("testing", "pki"),
    ("tracker", "pki"),
    ("tracker", "store"),
    ("tracker", "telemetry"),
    ("upstream", "testing"),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules `code` names through `crate::`.
fn imports(code: &str) -> BTreeSet<String> {
    let code: String = code
        .lines()
        .map(|l| l.split_once("//").map_or(l, |(before, _)| before))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = code[i + "crate::".len()..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: after `{` and after each `,`
            // at depth 0.
            let mut depth = 0;
            let mut start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && !c.is_whitespace() => {
                        start = false;
                        found.insert(ident(&group[j..]));
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.retain(|m| !m.is_empty());
    found
}

#[test]
fn top_level_modules_import_each_other_only_along_the_listed_edges() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut edges = BTreeSet::new();
    for entry in fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let module = path.file_stem().unwrap().to_string_lossy().into_owned();
        if matches!(module.as_str(), "lib" | "main") {
            continue;
        }
        let mut files = Vec::new();
        if path.is_dir() {
            rust_files(&path, &mut files);
        } else {
            files.push(path);
        }
        for file in files {
            for to in imports(&fs::read_to_string(&file).unwrap()) {
                if to != module {
                    edges.insert((module.clone(), to));
                }
            }
        }
    }
    let allowed: BTreeSet<(String, String)> = ALLOWED
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let new: Vec<_> = edges.difference(&allowed).collect();
    let gone: Vec<_> = allowed.difference(&edges).collect();
    assert!(
        new.is_empty(),
        "imports not in the module graph (agent/tests/layers.rs): {new:?}"
    );
    assert!(
        gone.is_empty(),
        "edges no longer in the code: strike them from ALLOWED: {gone:?}"
    );
}

/// The modules in an order where each imports only modules before it: the
/// layers, lowest first. `None` if the edges have a cycle.
fn layers(edges: &[(&str, &str)]) -> Option<Vec<String>> {
    let mut left: BTreeSet<(&str, &str)> = edges
        .iter()
        .copied()
        .filter(|(a, b)| *a != "testing" && *b != "testing")
        .collect();
    let mut modules: BTreeSet<&str> = left.iter().flat_map(|(a, b)| [*a, *b]).collect();
    let mut order = Vec::new();
    while !modules.is_empty() {
        // Those that import nothing still unplaced.
        let ready: Vec<&str> = modules
            .iter()
            .copied()
            .filter(|m| !left.iter().any(|(a, _)| a == m))
            .collect();
        if ready.is_empty() {
            return None;
        }
        for m in ready {
            modules.remove(m);
            left.retain(|(_, b)| *b != m);
            order.push(m.to_string());
        }
    }
    Some(order)
}

#[test]
fn the_module_graph_is_one_way() {
    let order = layers(ALLOWED).expect("the module graph in ALLOWED has a cycle");
    // The blob path's layers, lowest first, as ARCHITECTURE work will keep them.
    let pos = |m: &str| order.iter().position(|x| x == m).unwrap();
    for (low, high) in [
        ("telemetry", "registry"),
        ("store", "swarm"),
        ("tracker", "swarm"),
        ("swarm", "registry"),
        ("registry", "intercept"),
        ("intercept", "admin"),
        ("admin", "agent"),
    ] {
        assert!(
            pos(low) < pos(high),
            "{low} must sit below {high}: {order:?}"
        );
    }
    assert_eq!(layers(&[("a", "b"), ("b", "a")]), None);
}

#[test]
fn imports_are_read_from_paths_and_groups_not_comments() {
    let code = "use crate::{a::X, b::{c::Y, d}, e};\n\
                // crate::f in a comment\n\
                let x = crate::g::h(); fn f(_: crate::i::J) {}\n";
    let got: Vec<String> = imports(code).into_iter().collect();
    assert_eq!(got, ["a", "b", "e", "g", "i"]);
}
