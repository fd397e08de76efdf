//! A packet capture (`tcpdump -w`) in a namespace, and what the tests read from it: the
//! ESP-in-UDP packets (RFC 3948) seen, each with its source, SPI and sequence number, to
//! check that no (SPI, sequence number) pair was ever sent twice (with AES-GCM that would be
//! a nonce reused under one key).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns::Netns;
use crate::process::Daemon;
use crate::tools;
use crate::wait::{self, Probe};

/// tcpdump and the tools of this module.
pub const TOOLS: &[tools::Tool] = &[tools::TCPDUMP];

/// A running capture.
#[derive(Debug)]
pub struct Capture {
    daemon: Daemon,
    file: PathBuf,
}

/// One ESP-in-UDP packet of a capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EspPacket {
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub spi: u32,
    pub seq: u32,
}

impl Capture {
    /// Captures UDP port 4500 on `iface` in `ns` into `file` (the first 96 bytes of each
    /// packet: headers, SPI and sequence number).
    pub fn start(ns: &Netns, iface: &str, file: &Path, log: &Path) -> Result<Self> {
        let f = file.to_str().context("capture path")?;
        let args = [
            "-i", iface, "-U", "-s", "96", "-n", "-w", f, "udp", "port", "4500",
        ];
        let daemon = ns.spawn("tcpdump", tools::TCPDUMP.path(), &args, log)?;
        let mut c = Self {
            daemon,
            file: file.to_owned(),
        };
        // tcpdump writes the file header once it listens.
        let file = c.file.clone();
        let d = &mut c.daemon;
        wait::until("tcpdump to start capturing", Duration::from_secs(10), || {
            d.ensure_running()?;
            Ok(match std::fs::metadata(&file) {
                Ok(m) if m.len() >= 24 => Probe::Ready(()),
                _ => Probe::pending("no capture file yet"),
            })
        })?;
        Ok(c)
    }

    /// Stops the capture and reads its ESP packets.
    pub fn finish(mut self) -> Result<Vec<EspPacket>> {
        // -U wrote each packet as it came: a kill loses nothing but a partial last record,
        // which the reader skips.
        self.daemon.kill();
        let bytes = std::fs::read(&self.file).with_context(|| format!("reading {}", self.file.display()))?;
        esp_packets(&bytes)
    }
}

/// The ESP-in-UDP packets of a pcap file (Ethernet or Linux cooked capture; IPv4).
pub fn esp_packets(pcap: &[u8]) -> Result<Vec<EspPacket>> {
    if pcap.len() < 24 {
        bail!("not a pcap file ({} bytes)", pcap.len());
    }
    let le = match pcap[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => bail!("not a pcap file (magic {:02x?})", &pcap[..4]),
    };
    let u32_at = |b: &[u8], i: usize| {
        let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let link = u32_at(pcap, 20);
    let l2 = match link {
        1 => 14,   // Ethernet
        113 => 16, // Linux cooked (SLL)
        _ => bail!("pcap link type {link} not read here"),
    };
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let caplen = u32_at(pcap, at + 8) as usize;
        let start = at + 16;
        let Some(frame) = pcap.get(start..start + caplen) else {
            break; // A partial last record.
        };
        at = start + caplen;
        if let Some(p) = esp_in(frame.get(l2..).unwrap_or_default()) {
            out.push(p);
        }
    }
    Ok(out)
}

/// The ESP header of an IPv4/UDP datagram on port 4500, if it carries ESP (not IKE behind
/// the non-ESP marker, not a NAT keepalive).
fn esp_in(ip: &[u8]) -> Option<EspPacket> {
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 17 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let udp = ip.get(ihl..)?;
    let payload = udp.get(8..)?;
    if payload.len() < 8 || payload[..4] == [0, 0, 0, 0] {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some(EspPacket {
        src: IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15])),
        src_port: u16::from_be_bytes([udp[0], udp[1]]),
        dst: IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])),
        spi: be(&payload[..4]),
        seq: be(&payload[4..8]),
    })
}

/// The (SPI, sequence number) pairs that `packets` from `src` carry more than once, with
/// how often (a capture on a bridge sees each packet once).
pub fn repeated(packets: &[EspPacket], src: IpAddr) -> Vec<((u32, u32), usize)> {
    let mut seen: HashMap<(u32, u32), usize> = HashMap::new();
    for p in packets.iter().filter(|p| p.src == src) {
        *seen.entry((p.spi, p.seq)).or_default() += 1;
    }
    let mut twice: Vec<_> = seen.into_iter().filter(|(_, n)| *n > 1).collect();
    twice.sort_unstable();
    twice
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(src: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&[192, 0, 2, 11]);
        ip.extend_from_slice(&[0x11, 0x94, 0x11, 0x94, 0, 0, 0, 0]);
        ip.extend_from_slice(payload);
        f.extend_from_slice(&ip);
        f
    }

    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        p.extend_from_slice(&[0; 8]);
        p.extend_from_slice(&96u32.to_le_bytes());
        p.extend_from_slice(&1u32.to_le_bytes());
        for f in frames {
            p.extend_from_slice(&[0; 8]);
            p.extend_from_slice(&(f.len() as u32).to_le_bytes());
            p.extend_from_slice(&(f.len() as u32).to_le_bytes());
            p.extend_from_slice(f);
        }
        p
    }

    #[test]
    fn reads_esp_and_skips_ike_keepalives_and_a_partial_record() {
        let esp = |spi: u32, seq: u32| [spi.to_be_bytes(), seq.to_be_bytes()].concat();
        let mut p = pcap(&[
            frame([192, 0, 2, 2], &esp(0xabcd, 1)),
            frame([192, 0, 2, 2], &[0, 0, 0, 0, 1, 2, 3, 4, 5]),
            frame([192, 0, 2, 2], &[0xff]),
            frame([192, 0, 2, 2], &esp(0xabcd, 1)),
            frame([192, 0, 2, 9], &esp(0xabcd, 2)),
        ]);
        p.extend_from_slice(&[1, 2, 3]);
        let packets = esp_packets(&p).unwrap();
        assert_eq!(packets.len(), 3);
        assert_eq!(
            (packets[0].spi, packets[0].seq, packets[0].src_port),
            (0xabcd, 1, 4500)
        );
        let front: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(repeated(&packets, front), vec![((0xabcd, 1), 2)]);
        assert!(repeated(&packets, "192.0.2.9".parse().unwrap()).is_empty());
        assert!(esp_packets(b"nope").is_err());
    }
}
