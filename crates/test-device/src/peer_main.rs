//! The `main` of the scripted test peers (`BINARY SOCKET SCENARIO`): the scenario is checked
//! before anything listens (one the peer does not play would make a test meant to fail pass),
//! then every client that connects is played it on its own thread, so tests can open many
//! connections, at once or one after another, against one peer process. `#[path]`-included,
//! with `lifetime.rs`, by each peer binary.

use std::os::unix::net::{UnixListener, UnixStream};

/// Runs the peer `name` until it is killed; `known` says which scenarios it plays, `play`
/// plays one to a client.
pub fn serve(name: &str, known: fn(&str) -> bool, play: fn(UnixStream, &str)) {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(scenario)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: {name} SOCKET SCENARIO");
        std::process::exit(2);
    };
    if !known(scenario) {
        eprintln!("unknown scenario {scenario} (see the list at the top of {name}'s source)");
        std::process::exit(2);
    }
    crate::lifetime::die_with_parent(std::path::Path::new(path));
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {path}: {e}");
            std::process::exit(1);
        }
    };
    println!("listening {path}");
    for conn in listener.incoming() {
        let Ok(s) = conn else { break };
        let scenario = scenario.clone();
        std::thread::spawn(move || play(s, &scenario));
    }
    let _ = std::fs::remove_file(path);
}
