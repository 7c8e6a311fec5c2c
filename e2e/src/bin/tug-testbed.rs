//! `tug-testbed`: the test bed's pieces by hand, for the quick start and for humans.
//!
//! `tug-testbed registry [ADDR]` serves Debian's docker-registry, pre-loaded with the test images
//! (built with umoci and skopeo on first use), on ADDR (default 127.0.0.1:5000) until SIGINT or
//! SIGTERM, then stops it and removes its storage.

use std::net::SocketAddr;
use std::process::ExitCode;

use nix::sys::signal::{SigSet, Signal};
use tug_e2e::{Registry, RegistryOptions, TestImages};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["registry"] => serve("127.0.0.1:5000"),
        ["registry", addr] => serve(addr),
        _ => {
            eprintln!(
                "usage: tug-testbed registry [ADDR]   (serve the test images; default 127.0.0.1:5000)"
            );
            ExitCode::from(2)
        }
    }
}

fn serve(addr: &str) -> ExitCode {
    let addr: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(err) => {
            eprintln!("tug-testbed: bad address {addr:?}: {err}");
            return ExitCode::from(2);
        }
    };
    // Block the stop signals before any thread or child exists, then wait for one of them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if let Err(err) = signals.thread_block() {
        eprintln!("tug-testbed: cannot block signals: {err}");
        return ExitCode::FAILURE;
    }
    let started = TestImages::get().and_then(|images| {
        let registry = Registry::start_at(addr, RegistryOptions::default().with_images())?;
        Ok((images, registry))
    });
    let (images, registry) = match started {
        Ok(x) => x,
        Err(err) => {
            eprintln!("tug-testbed: {err}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "registry on http://{} (pid {}), serving:",
        registry.addr(),
        registry.pid()
    );
    for image in images.all() {
        println!("  {}  {}", image.reference(&registry), image.digest);
    }
    println!("stop with SIGINT or SIGTERM");
    match signals.wait() {
        Ok(sig) => println!("{sig}: stopping"),
        Err(err) => eprintln!("tug-testbed: waiting for a signal: {err}"),
    }
    drop(registry);
    ExitCode::SUCCESS
}
