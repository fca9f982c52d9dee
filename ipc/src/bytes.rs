//! `#[serde(with = "crate::bytes")]` for `Vec<u8>` payloads (bundle chunks, logs, output
//! chunks): serde's default treats a `Vec<u8>` as a sequence and bincode then encodes and
//! decodes it one element at a time, which cost 5–8 % of the gateway's and the helper's CPU on
//! the upload path. As bytes it is one length and one copy.
//!
//! The wire format does not change: bincode writes a byte sequence as its length (varint) and
//! then one byte per element, and a byte string as the same length and the same bytes (the
//! `given_..._then_the_wire_format_is_unchanged` test pins this).

use serde::de::{Deserializer, Error, SeqAccess, Visitor};
use serde::Serializer;

pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(bytes)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    d.deserialize_byte_buf(BytesVisitor)
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bytes")
    }

    fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    /// Formats that have no byte strings hand over a sequence; its length is not trusted for
    /// the allocation.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element()? {
            out.push(b);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct AsSeq(Vec<u8>);

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct AsBytes(#[serde(with = "super")] Vec<u8>);

    #[test]
    fn given_a_payload_when_encoded_as_bytes_then_the_wire_format_is_unchanged() {
        let cfg = bincode::config::standard();
        for len in [0usize, 1, 250, 251, 65_536, 300_000] {
            let data: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
            let seq = bincode::serde::encode_to_vec(AsSeq(data.clone()), cfg).unwrap();
            let bytes = bincode::serde::encode_to_vec(AsBytes(data.clone()), cfg).unwrap();
            assert_eq!(seq, bytes, "length {len}");
            let (back, used): (AsBytes, usize) =
                bincode::serde::decode_from_slice(&seq, cfg).unwrap();
            assert_eq!((back.0, used), (data, seq.len()));
        }
    }

    #[test]
    fn given_a_length_past_the_input_when_decoded_then_it_is_an_error_not_an_allocation() {
        let cfg = bincode::config::standard().with_limit::<1024>();
        // varint 0xFD = u32 follows: claims 4 GiB - 1 bytes.
        let lying = [0xFDu8, 0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3];
        let r: Result<(AsBytes, usize), _> = bincode::serde::decode_from_slice(&lying, cfg);
        assert!(r.is_err());
    }
}
