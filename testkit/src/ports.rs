//! Ports for the processes of a stack: one way to pick them, safe for processes that are
//! killed and started again on the same port in the middle of a test.
//!
//! A port is taken at random below Linux's ephemeral range (where outgoing connections take
//! their local ports: a port free now could be some connection's a moment later, and a node
//! restarted there would fail to bind), outside 20000-23999 (the fixed ports of
//! `stackctl cluster up`), never twice in one process, and only if it can be bound now.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

use anyhow::bail;

/// The fixed ports of `stackctl cluster up` live here; never handed out at random.
const RESERVED: std::ops::Range<u16> = 20_000..24_000;
const LOWEST: u16 = 10_000;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port on 127.0.0.1 that is free now (see the module doc).
pub fn pick() -> anyhow::Result<u16> {
    let below = ephemeral_low();
    let mut handed_out = crate::process::lock(&HANDED_OUT);
    let taken = handed_out.get_or_insert_with(HashSet::new);
    for _ in 0..2000 {
        let port = rand::random_range(LOWEST..below);
        if RESERVED.contains(&port) || taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return Ok(port);
        }
    }
    bail!("no free port found between {LOWEST} and {below}")
}

/// The low end of the ephemeral port range (`/proc/sys/net/ipv4/ip_local_port_range`).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&low| low > LOWEST + 2000)
        .unwrap_or(32_768)
}

/// `true` if something listens on `port` of 127.0.0.1.
pub fn in_use(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_and_never_repeat() {
        let ports: Vec<u16> = (0..50).map(|_| pick().unwrap()).collect();
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
        for p in ports {
            assert!(
                p >= LOWEST && p < ephemeral_low() && !RESERVED.contains(&p),
                "{p}"
            );
        }
    }
}
