//! The agent's top-level modules sit in layers, and a module imports only
//! modules of lower layers: the module graph is one way by construction.
//! ARCHITECTURE.md states the same table; a new module must be placed in it.
//!
//! An edge is a `crate::X` path (single or in a `use crate::{…}` group) in a
//! file of module M, tests included; comments are ignored. `testing`
//! (helpers for tests) is outside the layers: any module's tests may use it,
//! and it uses only `pki`.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

/// Lowest first. Keep in step with ARCHITECTURE.md.
const LAYERS: &[&[&str]] = &[
    // Shared words: imports nothing.
    &["vocab"],
    // Certificates, the kernel programs, and what every layer above
    // reports to, fetches from or stores in.
    &["pki", "steer", "telemetry", "origin", "store"],
    &["oci", "ca", "tracker"],
    &["swarm"],
    // Where a blob's bytes come from: cache, swarm or origin.
    &["acquire"],
    &["registry"],
    &["intercept"],
    &["admin"],
    &["cli"],
    &["agent"],
];

const TESTING_USES: &[&str] = &["pki"];

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

/// Every `(from, to)` import among the top-level modules.
fn edges() -> BTreeSet<(String, String)> {
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
    edges
}

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The edges that do not go down a layer.
fn upward<'a>(edges: impl IntoIterator<Item = &'a (String, String)>) -> Vec<String> {
    let mut bad = Vec::new();
    for (from, to) in edges {
        let ok = match (from.as_str(), to.as_str()) {
            (_, "testing") => true,
            ("testing", to) => TESTING_USES.contains(&to),
            (from, to) => matches!((layer(from), layer(to)), (Some(f), Some(t)) if t < f),
        };
        if !ok {
            bad.push(format!("{from} -> {to}"));
        }
    }
    bad
}

#[test]
fn every_top_level_module_has_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut missing = Vec::new();
    for entry in fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let module = path.file_stem().unwrap().to_string_lossy().into_owned();
        if !matches!(module.as_str(), "lib" | "main" | "testing") && layer(&module).is_none() {
            missing.push(module);
        }
    }
    assert!(
        missing.is_empty(),
        "place these in LAYERS (agent/tests/layers.rs) and ARCHITECTURE.md: {missing:?}"
    );
}

#[test]
fn top_level_modules_import_only_lower_layers() {
    let edges = edges();
    assert!(
        edges.len() > 30,
        "the import scan found too little: {edges:?}"
    );
    let bad = upward(&edges);
    assert!(
        bad.is_empty(),
        "imports that do not go down a layer (see LAYERS in agent/tests/layers.rs): {bad:?}"
    );
}

#[test]
fn an_import_within_a_layer_or_upward_is_caught() {
    let e = |a: &str, b: &str| (a.to_string(), b.to_string());
    let edges = [
        e("swarm", "store"),
        e("store", "origin"),
        e("store", "swarm"),
        e("vocab", "store"),
        e("pki", "testing"),
        e("testing", "store"),
    ];
    assert_eq!(
        upward(&edges),
        [
            "store -> origin",
            "store -> swarm",
            "vocab -> store",
            "testing -> store"
        ]
    );
}

#[test]
fn imports_are_read_from_paths_and_groups_not_comments() {
    let code = "use crate::{a::X, b::{c::Y, d}, e};\n\
                // crate::f in a comment\n\
                let x = crate::g::h(); fn f(_: crate::i::J) {}\n";
    let got: Vec<String> = imports(code).into_iter().collect();
    assert_eq!(got, ["a", "b", "e", "g", "i"]);
}
