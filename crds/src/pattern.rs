//! Peer-ID patterns: `*` matches any run of characters (also empty), `?` exactly one.
//! Everything else matches itself, case-sensitively, as in strongSwan's identity wildcards.

use crate::ValidationError;

/// Longest identity we accept in a pattern; IKE identities in practice are far shorter.
pub const MAX_LEN: usize = 255;

/// Checks that `pattern` is a usable peer-ID pattern.
pub fn validate(field: &str, pattern: &str) -> Result<(), ValidationError> {
    if pattern.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if pattern.len() > MAX_LEN {
        return Err(ValidationError::new(
            field,
            format!("is {} bytes long; at most {MAX_LEN} are allowed", pattern.len()),
        ));
    }
    if let Some(c) = pattern.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(ValidationError::new(
            field,
            format!(
                "'{}' contains the character {c:?}; peer IDs have no spaces or control characters",
                pattern.escape_debug()
            ),
        ));
    }
    Ok(())
}

/// Does `id` match `pattern`?
pub fn matches(pattern: &str, id: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), id.as_bytes());
    let (mut pi, mut si) = (0, 0);
    // Position after the last `*` seen and the input position it was tried at: on a mismatch
    // the star swallows one more byte, which keeps the match linear in practice.
    let mut backtrack: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                backtrack = Some((pi + 1, si));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match backtrack {
                Some((bp, bs)) => {
                    pi = bp;
                    si = bs + 1;
                    backtrack = Some((bp, bs + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Is there any identity that matches both patterns? Egroups bound to one fleet must not
/// overlap, otherwise a site's ID would pick a database by accident.
pub fn overlap(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let width = b.len() + 1;
    // reach[i * width + j]: the prefixes a[..i] and b[..j] can produce a common string.
    let mut reach = vec![false; (a.len() + 1) * width];
    reach[0] = true;
    for i in 0..=a.len() {
        for j in 0..=b.len() {
            if !reach[i * width + j] {
                continue;
            }
            let (ca, cb) = (a.get(i), b.get(j));
            // A star may stop producing; the other side then goes on alone.
            if ca == Some(&b'*') {
                reach[(i + 1) * width + j] = true;
                // ...or produce whatever the other side's next token produces.
                if cb.is_some() {
                    reach[i * width + j + 1] = true;
                }
            }
            if cb == Some(&b'*') {
                reach[i * width + j + 1] = true;
                if ca.is_some() {
                    reach[(i + 1) * width + j] = true;
                }
            }
            if let (Some(&x), Some(&y)) = (ca, cb)
                && x != b'*'
                && y != b'*'
                && (x == y || x == b'?' || y == b'?')
            {
                reach[(i + 1) * width + j + 1] = true;
            }
        }
    }
    reach[a.len() * width + b.len()]
}

/// Is the pattern a plain identity without wildcards?
pub fn is_literal(pattern: &str) -> bool {
    !pattern.contains(['*', '?'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_and_question_mark() {
        assert!(matches("*.sites.example.com", "a.sites.example.com"));
        assert!(matches("*.sites.example.com", ".sites.example.com"));
        assert!(!matches("*.sites.example.com", "sites.example.com"));
        assert!(matches("site-???", "site-042"));
        assert!(!matches("site-???", "site-42"));
        assert!(matches("*", ""));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("a*b*c", "aXXbYY"));
        assert!(matches("**a", "a"));
        assert!(matches("exact@example.com", "exact@example.com"));
        assert!(!matches("Exact", "exact"));
    }

    #[test]
    fn overlap_is_symmetric_and_exact() {
        let cases = [
            ("*.a.com", "*.b.com", false),
            ("*.a.com", "x.*", true),
            ("site-??", "site-1*", true),
            ("site-??", "site-1??", false),
            ("*", "anything", true),
            ("abc", "abd", false),
            ("a*", "*b", true),
            ("a*x", "*y", false),
            ("?", "", false),
            ("*", "", true),
        ];
        for (a, b, want) in cases {
            assert_eq!(overlap(a, b), want, "{a} vs {b}");
            assert_eq!(overlap(b, a), want, "{b} vs {a}");
        }
    }

    #[test]
    fn overlap_agrees_with_matches_on_literals() {
        for (p, id) in [("a*c", "abc"), ("a?c", "ac"), ("*x*", "yyy"), ("?*?", "ab")] {
            assert_eq!(overlap(p, id), matches(p, id), "{p} vs {id}");
        }
    }

    #[test]
    fn rejects_empty_and_spaces() {
        assert!(validate("spec.peerId", "").is_err());
        let e = validate("spec.peerId", "a b").unwrap_err();
        assert_eq!(e.field, "spec.peerId");
        assert!(validate("f", &"x".repeat(256)).is_err());
        assert!(validate("f", "*.example.com").is_ok());
    }
}
