//! Live migration of a machine's RAM from this process to a second one.
//!
//! ```text
//! cargo run --release --example migrate -- [--tcp] [--mib N]
//! ```
//!
//! Builds a machine with N MiB of RAM (default 1024) in four regions, starts
//! two writer threads dirtying random pages, spawns itself as the receiver
//! (`receive <unix path | tcp addr> <mib>`), migrates over a Unix socket (or
//! TCP on loopback with `--tcp`) and compares the receiver's per-region
//! checksums with the sender's at the stop.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use memtree::migration::{self, SendConfig};
use memtree::{Endian, MemTxAttrs, Memory, SpaceId};

const A: MemTxAttrs = MemTxAttrs::UNSPECIFIED;

fn machine(mib: u64) -> (Memory, SpaceId) {
    let memory = Memory::new();
    let root = memory.new_container("system", 1 << 40, None).unwrap();
    for i in 0..4u64 {
        let r = memory
            .new_ram(&format!("ram{i}"), u128::from((mib << 20) / 4), None)
            .unwrap();
        memory.add_subregion(root, i << 30, r).unwrap();
    }
    let space = memory.new_address_space("memory", root, None).unwrap();
    (memory, space)
}

fn receive(addr: &str, mib: u64) -> Result<(), String> {
    let (memory, space) = machine(mib);
    let stream: Box<dyn Read> = if let Some(tcp) = addr.strip_prefix("tcp:") {
        Box::new(std::net::TcpStream::connect(tcp).map_err(|e| e.to_string())?)
    } else {
        Box::new(std::os::unix::net::UnixStream::connect(addr).map_err(|e| e.to_string())?)
    };
    // A fresh machine: no kernel pin or memory policy refers to its RAM
    // yet, so the received pages may be moved in rather than copied.
    let cfg = migration::ReceiveConfig {
        move_pages: true,
        ..Default::default()
    };
    let stats = migration::receive_with(&memory, space, stream, &cfg).map_err(|e| e.to_string())?;
    println!("RECEIVED rounds={} records={}", stats.rounds, stats.records);
    for (name, sum) in migration::checksums(&memory, space).map_err(|e| e.to_string())? {
        println!("CHECKSUM {name} {sum:016x}");
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("receive") {
        let (Some(addr), Some(mib)) = (args.get(1), args.get(2).and_then(|m| m.parse().ok()))
        else {
            eprintln!("usage: migrate receive <path|tcp:addr> <mib>");
            std::process::exit(2);
        };
        if let Err(e) = receive(addr, mib) {
            eprintln!("receiver: {e}");
            std::process::exit(1);
        }
        return;
    }
    let tcp = args.iter().any(|a| a == "--tcp");
    let mib: u64 = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .and_then(|m| m.parse().ok())
        .unwrap_or(1024);

    let exe = std::env::current_exe().expect("own path");
    let dir = std::env::temp_dir().join(format!("memtree-migrate-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    enum Listener {
        Unix(std::os::unix::net::UnixListener),
        Tcp(std::net::TcpListener),
    }
    let (listener, addr) = if tcp {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = format!("tcp:{}", l.local_addr().unwrap());
        (Listener::Tcp(l), a)
    } else {
        let p = dir.join("sock");
        let l = std::os::unix::net::UnixListener::bind(&p).expect("bind");
        (Listener::Unix(l), p.display().to_string())
    };
    let mut child = std::process::Command::new(exe)
        .args(["receive", &addr, &mib.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the receiver");
    let stream: Box<dyn Write> = match &listener {
        Listener::Unix(l) => Box::new(l.accept().expect("accept").0),
        Listener::Tcp(l) => Box::new(l.accept().expect("accept").0),
    };

    let (memory, space) = machine(mib);
    let h = memory.address_space(space).unwrap();
    let region = (mib << 20) / 4;
    let gate = Arc::new(RwLock::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let (h, gate, stop, writes) = (h.clone(), gate.clone(), stop.clone(), writes.clone());
            std::thread::spawn(move || {
                let mut s = 0x2545_f491_4f6c_dd1d ^ (t + 1);
                while !stop.load(Ordering::Relaxed) {
                    let g = gate.read().unwrap();
                    for _ in 0..16 {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        let addr = ((s % 4) << 30) + (s >> 8) % (region - 8);
                        let _ = h.store::<u64>(addr, s, Endian::Little, A);
                    }
                    writes.fetch_add(16, Ordering::Relaxed);
                    drop(g);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            })
        })
        .collect();
    // The source stays stopped once the migration completed (as QEMU's
    // does): the writers stay paused until its memory was checksummed.
    let mut paused = None;
    let stats = migration::send(&memory, space, stream, &SendConfig::default(), |on| {
        if on {
            paused = Some(gate.write().unwrap());
        }
    })
    .expect("migration failed");
    let at_stop = migration::checksums(&memory, space).expect("checksums");
    stop.store(true, Ordering::Relaxed);
    drop(paused);
    for w in writers {
        w.join().unwrap();
    }
    let mut out = child.stdout.take().expect("receiver output");
    let mut theirs = Vec::new();
    for line in BufReader::new(&mut out).lines().map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("CHECKSUM ") {
            if let Some((n, c)) = rest.split_once(' ') {
                theirs.push((n.to_owned(), u64::from_str_radix(c, 16).unwrap_or(0)));
            }
        }
    }
    let status = child.wait().expect("receiver exit status");
    let _ = std::fs::remove_dir_all(&dir);
    if !status.success() {
        eprintln!("the receiver failed: {status}");
        std::process::exit(1);
    }
    println!(
        "{} MiB over {}: rounds {} {:?}, pages sent {} (+{} zero), {} MiB on the wire, \
         {} writes meanwhile, downtime {:?}, total {:?}",
        mib,
        if tcp { "TCP loopback" } else { "a Unix socket" },
        stats.rounds,
        stats.pages_per_round,
        stats.pages_sent,
        stats.zero_pages,
        stats.bytes >> 20,
        writes.load(Ordering::Relaxed),
        stats.downtime,
        stats.total
    );
    if theirs == at_stop && stats.checksums == at_stop {
        println!(
            "receiver equals sender: {} regions, checksums match",
            theirs.len()
        );
    } else {
        eprintln!(
            "MISMATCH: sender at the stop {at_stop:?}, sent {:?}, receiver {theirs:?}",
            stats.checksums
        );
        std::process::exit(1);
    }
}
