//! `ImportSites` carries a CSV file in pieces: [`requests`] cuts it on the client,
//! [`Assembler`] puts it back together on the gateway. The pieces keep every message far
//! below gRPC's 4 MiB default; [`MAX_CSV_BYTES`] bounds what one import holds in memory.

use zeroize::Zeroizing;

use crate::admin::ImportSitesRequest;

/// The largest piece of the file one message carries.
pub const CHUNK_BYTES: usize = 1 << 20;

/// The largest file one import takes (about 800 000 sites of 80 bytes).
pub const MAX_CSV_BYTES: usize = 64 << 20;

/// A file larger than [`MAX_CSV_BYTES`].
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{file}: more than {} MiB ({size} bytes or more), the most one import takes: split it into \
     smaller files (each is imported all or nothing)",
    MAX_CSV_BYTES >> 20
)]
pub struct TooLarge {
    pub file: String,
    pub size: u64,
}

/// The messages that carry `csv` (the file `file`) in order: the first also names the file
/// and `prefix`. An empty file is one message with no bytes.
pub fn requests(file: &str, csv: &[u8], prefix: Option<u8>) -> Result<Vec<ImportSitesRequest>, TooLarge> {
    if csv.len() > MAX_CSV_BYTES {
        return Err(TooLarge {
            file: file.to_owned(),
            size: csv.len() as u64,
        });
    }
    let mut out: Vec<ImportSitesRequest> = csv
        .chunks(CHUNK_BYTES)
        .map(|c| ImportSitesRequest {
            csv: c.to_vec(),
            ..ImportSitesRequest::default()
        })
        .collect();
    if out.is_empty() {
        out.push(ImportSitesRequest::default());
    }
    out[0].file = file.to_owned();
    out[0].prefix = prefix.map(u32::from);
    Ok(out)
}

/// The file as the gateway received it.
pub struct Assembled {
    /// The name the client gave (`-` when it gave none).
    pub file: String,
    /// The prefix length every subnet must have, if any (as sent: not checked to be one).
    pub prefix: Option<u32>,
    /// The bytes, wiped when dropped (they hold PSKs).
    pub csv: Zeroizing<Vec<u8>>,
}

/// Puts the pieces back together, refusing more than [`MAX_CSV_BYTES`].
#[derive(Default)]
pub struct Assembler {
    first: Option<(String, Option<u32>)>,
    csv: Zeroizing<Vec<u8>>,
}

// The bytes hold PSKs: Debug shows their length only.
impl std::fmt::Debug for Assembled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assembled")
            .field("file", &self.file)
            .field("prefix", &self.prefix)
            .field("csv_bytes", &self.csv.len())
            .finish()
    }
}

impl std::fmt::Debug for Assembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assembler")
            .field("first", &self.first)
            .field("csv_bytes", &self.csv.len())
            .finish()
    }
}

impl Assembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next piece (its bytes are wiped once copied).
    pub fn push(&mut self, mut piece: ImportSitesRequest) -> Result<(), TooLarge> {
        let (file, _) = self
            .first
            .get_or_insert_with(|| (std::mem::take(&mut piece.file), piece.prefix));
        if self.csv.len() + piece.csv.len() > MAX_CSV_BYTES {
            let size = (self.csv.len() + piece.csv.len()) as u64;
            zeroize::Zeroize::zeroize(&mut piece.csv);
            return Err(TooLarge {
                file: file.clone(),
                size,
            });
        }
        let needed = self.csv.len() + piece.csv.len();
        if needed > self.csv.capacity() {
            // Grown by hand: `extend` would reallocate and free the old buffer unwiped; this
            // one is wiped when `grown` replaces it.
            let mut grown = Zeroizing::new(Vec::with_capacity(needed.max(2 * self.csv.capacity())));
            grown.extend_from_slice(&self.csv);
            self.csv = grown;
        }
        self.csv.extend_from_slice(&piece.csv);
        zeroize::Zeroize::zeroize(&mut piece.csv);
        Ok(())
    }

    /// The whole file (`None`: no piece came).
    pub fn finish(self) -> Option<Assembled> {
        let (file, prefix) = self.first?;
        Some(Assembled {
            file: if file.is_empty() { "-".to_owned() } else { file },
            prefix,
            csv: self.csv,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_bytes() {
        let mut a = Assembler::new();
        a.push(ImportSitesRequest {
            file: "s.csv".into(),
            csv: b"peer_id,psk\nsite-1,very-secret-psk\n".to_vec(),
            ..ImportSitesRequest::default()
        })
        .unwrap();
        assert!(!format!("{a:?}").contains("very-secret-psk"), "{a:?}");
        let done = a.finish().unwrap();
        assert!(!format!("{done:?}").contains("very-secret-psk"), "{done:?}");
    }

    #[test]
    fn pieces_put_back_together_are_the_file() {
        let csv: Vec<u8> = (0..(2 * CHUNK_BYTES + 17)).map(|i| (i % 251) as u8).collect();
        let pieces = requests("sites.csv", &csv, Some(24)).unwrap();
        assert_eq!(pieces.len(), 3);
        assert!(pieces.iter().all(|p| p.csv.len() <= CHUNK_BYTES));
        assert_eq!(
            (pieces[0].file.as_str(), pieces[0].prefix),
            ("sites.csv", Some(24))
        );
        assert!(
            pieces[1..]
                .iter()
                .all(|p| p.file.is_empty() && p.prefix.is_none())
        );
        let mut a = Assembler::new();
        for p in pieces {
            a.push(p).unwrap();
        }
        let got = a.finish().unwrap();
        assert_eq!((got.file.as_str(), got.prefix), ("sites.csv", Some(24)));
        assert_eq!(*got.csv, csv);
    }

    #[test]
    fn an_empty_file_is_one_piece_that_names_it() {
        let pieces = requests("empty.csv", b"", None).unwrap();
        assert_eq!(pieces.len(), 1);
        let mut a = Assembler::new();
        a.push(pieces.into_iter().next().unwrap()).unwrap();
        let got = a.finish().unwrap();
        assert_eq!(
            (got.file.as_str(), got.prefix, got.csv.len()),
            ("empty.csv", None, 0)
        );
        assert!(Assembler::new().finish().is_none(), "no piece: nothing to import");
    }

    #[test]
    fn rejects_a_file_over_the_limit_on_both_ends() {
        let big = vec![b'x'; MAX_CSV_BYTES + 1];
        let e = requests("big.csv", &big, None).unwrap_err();
        assert!(e.to_string().starts_with("big.csv: more than 64 MiB"), "{e}");
        // A client that sends more anyway is stopped at the piece that crosses the limit.
        let mut a = Assembler::new();
        let piece = |csv: Vec<u8>| ImportSitesRequest {
            csv,
            file: "big.csv".into(),
            prefix: None,
        };
        for _ in 0..MAX_CSV_BYTES / CHUNK_BYTES {
            a.push(piece(vec![b'x'; CHUNK_BYTES])).unwrap();
        }
        let e = a.push(piece(vec![b'x'])).unwrap_err();
        assert_eq!(e.file, "big.csv");
        assert_eq!(e.size, MAX_CSV_BYTES as u64 + 1);
    }
}
