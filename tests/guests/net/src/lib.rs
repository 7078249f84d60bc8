//! A guest that tries to open a network connection. Rust's std then imports wasi:sockets, which
//! waft links but refuses: the guest loads, and every connect fails the same way on every replica.
//! The command `udp` tries to bind a UDP socket instead (refused too).

use waft_guest::{Context, StateMachine};

#[derive(Default)]
struct Net;

impl StateMachine for Net {
    fn apply(&mut self, _ctx: &Context, command: &[u8]) -> Result<Vec<u8>, String> {
        let addr = String::from_utf8_lossy(command).into_owned();
        if addr == "udp" {
            return match std::net::UdpSocket::bind("127.0.0.1:0") {
                Ok(_) => Ok(b"bound".to_vec()),
                Err(e) => Err(format!("udp: {e}")),
            };
        }
        match std::net::TcpStream::connect(addr.as_str()) {
            Ok(_) => Ok(b"connected".to_vec()),
            Err(e) => Err(e.to_string()),
        }
    }
    fn query(&self, _request: &[u8]) -> Result<Vec<u8>, String> {
        Ok(Vec::new())
    }
    fn snapshot(&self) -> Vec<u8> {
        Vec::new()
    }
    fn restore(_snapshot: &[u8]) -> Result<Self, String> {
        Ok(Net)
    }
}

waft_guest::export!(Net);
