//! Module edges the compiler cannot guard inside one crate: the hot path must not reach
//! into the control side, and nothing may import the composition root.

fn sources(dir: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src")).join(dir)];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            stack.extend(std::fs::read_dir(&path).expect("readable").map(|e| e.expect("entry").path()));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push((path.display().to_string(), std::fs::read_to_string(&path).expect("utf-8 source")));
        }
    }
    out
}

#[test]
fn the_hot_path_does_not_name_the_control_side() {
    // `routes` defines the writer; the hot path proper must not even name it.
    for (dir, also) in [("proxy", Some("TableWriter")), ("upstream", Some("TableWriter")), ("routes", None)] {
        for (file, text) in sources(dir) {
            for forbidden in ["crate::control", "crate::admin", "crate::app", "crate::rollout"].into_iter().chain(also)
            {
                assert!(!text.contains(forbidden), "{file} names {forbidden}: the hot path only reads the table");
            }
        }
    }
}

#[test]
fn only_the_binary_and_the_demo_use_the_composition_root() {
    for (file, text) in sources("") {
        if file.ends_with("app.rs") || file.ends_with("lib.rs") || file.ends_with("main.rs") || file.contains("/demo/")
        {
            continue;
        }
        assert!(!text.contains("crate::app"), "{file} imports the composition root");
    }
}
