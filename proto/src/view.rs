//! Tables of what the admin API answers, as the gateway's and kubectl's commands print them.

use crate::admin::Tunnel;

/// One line per tunnel: peer ID, base eroute, egroup, bytes, idle time, and the member that
/// holds it (in a fleet); `wide` adds the peer's address, its remote subnet and the CHILD SA
/// count.
pub fn tunnels_table(tunnels: &[Tunnel], wide: bool) -> String {
    let fleet = tunnels.iter().any(|t| !t.member.is_empty());
    let mut header = vec!["PEER ID", "EROUTE", "EGROUP"];
    if wide {
        header.extend(["PEER ADDRESS", "REMOTE SUBNET", "SAS"]);
    }
    header.extend(["BYTES IN", "BYTES OUT", "IDLE"]);
    if fleet {
        header.push("MEMBER");
    }
    let rows: Vec<Vec<String>> = tunnels
        .iter()
        .map(|t| {
            let egroup = if t.egroup.is_empty() {
                "-".into()
            } else {
                t.egroup.clone()
            };
            let mut row = vec![t.remote_peer_id.clone(), t.base_eroute.clone(), egroup];
            if wide {
                row.extend([
                    t.peer_address.clone(),
                    t.remote_subnet.clone(),
                    t.child_sas.len().to_string(),
                ]);
            }
            row.extend([
                t.bytes_in.to_string(),
                t.bytes_out.to_string(),
                format!("{}s", t.idle_seconds),
            ]);
            if fleet {
                row.push(t.member.clone());
            }
            row
        })
        .collect();
    table(&header, &rows)
}

/// Columns aligned on the widest cell, two spaces apart, as kubectl prints them.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        l.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_and_wide_tables_align_their_columns() {
        let t = Tunnel {
            remote_peer_id: "site1.example".into(),
            base_eroute: "branches".into(),
            peer_address: "192.0.2.11:4500".into(),
            bytes_in: 10,
            member: "gw-1".into(),
            ..Tunnel::default()
        };
        let narrow = tunnels_table(std::slice::from_ref(&t), false);
        assert_eq!(
            narrow,
            "PEER ID        EROUTE    EGROUP  BYTES IN  BYTES OUT  IDLE  MEMBER\n\
             site1.example  branches  -       10        0          0s    gw-1\n"
        );
        let wide = tunnels_table(&[t], true);
        assert!(wide.starts_with("PEER ID        EROUTE    EGROUP  PEER ADDRESS     REMOTE SUBNET  SAS"));
    }
}
