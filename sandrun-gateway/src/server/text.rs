//! Job output as JSON: the exact bytes in standard base64, plus a UTF-8 text rendering for
//! clients of the original API.
//!
//! The text is lossy (bytes that are not UTF-8 become U+FFFD, as `String::from_utf8_lossy` does),
//! but a streamed output is decoded as one text: [`Utf8Carry`] holds back an incomplete
//! multi-byte sequence at the end of a chunk and decodes it with the next chunk of the same
//! stream, so a character split between two chunks is not broken.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// The standard base64 (with padding) of `bytes`.
pub fn base64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// A streaming lossy UTF-8 decoder for one output stream.
#[derive(Debug, Default)]
pub struct Utf8Carry {
    /// The start of a multi-byte sequence that the last chunk ended in: at most 3 bytes.
    pending: Vec<u8>,
}

impl Utf8Carry {
    /// Decodes `chunk` after whatever the previous chunk left over, and keeps back a trailing
    /// incomplete sequence for the next call.
    pub fn decode(&mut self, chunk: &[u8]) -> String {
        let mut bytes = std::mem::take(&mut self.pending);
        bytes.extend_from_slice(chunk);
        let mut text = String::with_capacity(bytes.len());
        let mut rest = bytes.as_slice();
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    text.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        // Invalid bytes: replaced, as `from_utf8_lossy` does.
                        Some(len) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = after.get(len..).unwrap_or_default();
                        }
                        // The input ends inside a sequence that may still complete.
                        None => {
                            self.pending = after.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        text
    }

    /// What is left at the end of the stream (an incomplete sequence, decoded as U+FFFD), or
    /// `None` if the stream ended on a character boundary.
    pub fn flush(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.pending);
        Some(String::from_utf8_lossy(&rest).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `chunks` in order, flushing at the end.
    fn decode_all(chunks: &[&[u8]]) -> Vec<String> {
        let mut carry = Utf8Carry::default();
        let mut out: Vec<String> = chunks.iter().map(|c| carry.decode(c)).collect();
        out.extend(carry.flush());
        out
    }

    #[test]
    fn given_a_chunk_boundary_inside_a_four_byte_char_then_the_char_is_decoded_whole_once() {
        let smile = "\u{1F600}".as_bytes();
        let out = decode_all(&[b"a", &smile[..1], &smile[1..3], &[smile[3], b'b']]);
        assert_eq!(out, vec!["a", "", "", "\u{1F600}b"]);
    }

    #[test]
    fn given_any_split_of_mixed_output_then_the_joined_text_equals_lossy_decoding_of_the_whole() {
        let mut whole = b"bin:\xff\xfe\x80\xc0\x80\xe2\x82 end \xe2\x82\xac ".to_vec();
        whole.extend_from_slice("\u{1F600}\u{1F600}".as_bytes());
        whole.extend_from_slice(b"\xf0\x9f");
        let expected = String::from_utf8_lossy(&whole).into_owned();
        for a in 0..=whole.len() {
            for b in a..=whole.len() {
                let joined = decode_all(&[&whole[..a], &whole[a..b], &whole[b..]]).concat();
                assert_eq!(joined, expected, "split at {a} and {b}");
            }
        }
    }

    #[test]
    fn given_a_stream_ending_inside_a_char_then_flush_gives_one_replacement_and_empties() {
        let mut carry = Utf8Carry::default();
        assert_eq!(carry.decode(b"x\xe2\x82"), "x");
        assert_eq!(carry.flush().as_deref(), Some("\u{FFFD}"));
        assert_eq!(carry.flush(), None);
        assert_eq!(carry.decode(b"y"), "y");
    }

    #[test]
    fn given_invalid_bytes_then_base64_round_trips_them_exactly() {
        let bytes: Vec<u8> = b"\xff\xfe\x80\xc0\x80\xe2\x82\x00\"\\"
            .iter()
            .copied()
            .chain(0..=255)
            .collect();
        let encoded = base64(&bytes);
        assert!(encoded.is_ascii());
        assert_eq!(STANDARD.decode(&encoded).ok(), Some(bytes));
        assert_eq!(base64(b"\xff"), "/w==");
    }
}
