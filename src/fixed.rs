//! Text in shared memory: a fixed buffer of `N` bytes, NUL-terminated, truncated at a character
//! boundary like PostgreSQL truncates names.

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FixedText<const N: usize>([u8; N]);

impl<const N: usize> FixedText<N> {
    pub fn new(s: &str) -> Self {
        let mut end = s.len().min(N - 1);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; N];
        bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
        FixedText(bytes)
    }

    pub fn as_str(&self) -> &str {
        let len = self.0.iter().position(|b| *b == 0).unwrap_or(N);
        std::str::from_utf8(&self.0[..len]).unwrap_or("")
    }
}

impl<const N: usize> Default for FixedText<N> {
    fn default() -> Self {
        FixedText([0u8; N])
    }
}

impl<const N: usize> std::fmt::Debug for FixedText<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::FixedText;

    #[test]
    fn truncates_at_a_character_boundary_and_keeps_a_terminator() {
        assert_eq!(FixedText::<8>::new("shop").as_str(), "shop");
        assert_eq!(FixedText::<8>::new("abcdefghij").as_str(), "abcdefg");
        assert_eq!(FixedText::<8>::new("abcdefé").as_str(), "abcdef", "é would straddle the last byte");
        assert_eq!(FixedText::<8>::default().as_str(), "");
    }
}
