//! RFC 8628 user codes: 8 letters from a 20-consonant alphabet, shown to
//! people as `XXXX-XXXX`. The server and the CLI both parse what a person
//! typed through [`UserCode::parse`], so they agree on every accepted form.

/// RFC 8628 §6.1: consonants only (no words), none that look alike.
pub const ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
/// Letters in a code (20^8 ≈ 2.6 × 10^10 codes).
pub const LEN: usize = 8;

/// A well-formed user code, held in canonical form (8 upper-case letters,
/// no separator). `Display` gives the `XXXX-XXXX` form people see.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserCode(String);

/// Why typed text is not a user code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a user code is 8 letters from BCDFGHJKLMNPQRSTVWXZ, shown as XXXX-XXXX")]
pub struct BadUserCode;

impl UserCode {
    /// Accepts `bcdf-ghjk`, `BCDF GHJK`, `bcdfghjk`, …: people copy codes
    /// with or without the dash and in any case.
    pub fn parse(input: &str) -> Result<Self, BadUserCode> {
        let code: String =
            input.trim().chars().filter(|c| !matches!(c, '-' | ' ')).map(|c| c.to_ascii_uppercase()).collect();
        if code.len() == LEN && code.bytes().all(|b| ALPHABET.contains(&b)) { Ok(Self(code)) } else { Err(BadUserCode) }
    }

    /// A new code; `pick(n)` returns an index below `n` (the caller's RNG,
    /// so this crate stays free of I/O and tests can fix the outcome).
    pub fn generate(mut pick: impl FnMut(usize) -> usize) -> Self {
        Self((0..LEN).map(|_| ALPHABET[pick(ALPHABET.len()) % ALPHABET.len()] as char).collect())
    }

    /// The canonical form the server stores and compares.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for UserCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Always LEN ASCII letters, so splitting in the middle is on a char boundary.
        let (a, b) = self.0.split_at(LEN / 2);
        write!(f, "{a}-{b}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_typed_form_parses_to_the_same_code() {
        for typed in ["BCDF-GHJK", "bcdf-ghjk", "BCDFGHJK", "bcdf ghjk", " BcDf-GhJk "] {
            let code = UserCode::parse(typed).expect(typed);
            assert_eq!(code.as_str(), "BCDFGHJK");
            assert_eq!(code.to_string(), "BCDF-GHJK");
        }
    }

    #[test]
    fn vowels_lookalikes_and_wrong_lengths_are_refused() {
        for typed in ["", "BCDF-GHJ", "BCDF-GHJKL", "ABCD-FGHJ", "BCDF-GHJ0", "BCDF_GHJK", "BCDF-GHJÉ"] {
            assert_eq!(UserCode::parse(typed), Err(BadUserCode), "{typed:?}");
        }
    }

    #[test]
    fn generated_codes_use_the_alphabet_and_parse_back() {
        let mut n = 0;
        let code = UserCode::generate(|len| {
            n += 7;
            n % len
        });
        assert_eq!(UserCode::parse(&code.to_string()), Ok(code.clone()));
        // An out-of-range pick still lands in the alphabet.
        assert_eq!(UserCode::generate(|_| usize::MAX).as_str().len(), LEN);
    }
}
