//! Fuzz target: body framing. Any bytes as a body framed by content-length, chunked coding or
//! the close, whole or cut into up to three reads, go through the body decoder: no panic, no
//! more than the framing allows comes out, and a cut never changes the answer.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use vmesh_agent::upstream::h1::framing::{BodyDecoder, BodyError, Decoded, ResponseFraming};
use vmesh_agent::upstream::h1::Limits;

#[derive(Debug, PartialEq)]
enum Outcome {
    /// The body, its trailers, what followed it.
    Ended(Vec<u8>, Option<Vec<(String, Vec<u8>)>>, Vec<u8>),
    /// The input ran out first: the data so far, and what the close then made of it.
    Open(Vec<u8>, Result<(), BodyError>),
    Failed(BodyError),
}

fn run(framing: ResponseFraming, limits: Limits, input: &[u8], cuts: &[usize]) -> Outcome {
    let mut decoder = BodyDecoder::new(framing, &limits);
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    let mut start = 0;
    for end in cuts.iter().copied().chain([input.len()]) {
        let end = end.clamp(start, input.len());
        buf.extend_from_slice(&input[start..end]);
        start = end;
        loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Data(d)) => {
                    assert!(!d.is_empty(), "empty data");
                    data.extend_from_slice(&d);
                }
                Ok(Decoded::End(t)) => {
                    assert!(decoder.is_done());
                    buf.extend_from_slice(&input[start..]);
                    let t = t.map(|t| {
                        t.iter()
                            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                            .collect()
                    });
                    return Outcome::Ended(data, t, buf.to_vec());
                }
                Ok(Decoded::NeedMore) => {
                    assert!(buf.is_empty(), "bytes left behind");
                    break;
                }
                Err(e) => return Outcome::Failed(e),
            }
        }
    }
    let at_eof = match decoder.eof() {
        Ok(Decoded::End(_)) => Ok(()),
        Ok(other) => panic!("eof gave {other:?}"),
        Err(e) => Err(e),
    };
    Outcome::Open(data, at_eof)
}

fuzz_target!(|data: &[u8]| {
    // [framing, length, length, limits, cut, cut, body...]
    let [kind, l1, l2, small, c1, c2, input @ ..] = data else {
        return;
    };
    let length = u64::from(u16::from_le_bytes([*l1, *l2]));
    let framing = match kind % 3 {
        0 => ResponseFraming::Length(length),
        1 => ResponseFraming::Chunked,
        _ => ResponseFraming::CloseDelimited,
    };
    let limits = if small % 2 == 0 {
        Limits::default()
    } else {
        Limits {
            max_chunk_size_line: 1 + usize::from(small / 2) % 8,
            max_chunk_extensions: 1 + u64::from(*small) % 32,
            max_trailer_bytes: 2 + usize::from(*small) % 64,
            max_trailers: usize::from(*small) % 4,
            ..Limits::default()
        }
    };
    let whole = run(framing, limits, input, &[]);
    if let (ResponseFraming::Length(n), Outcome::Ended(body, ..) | Outcome::Open(body, _)) = (framing, &whole) {
        assert!(body.len() as u64 <= n, "more than the content-length");
    }
    let len = input.len().max(1);
    let (a, b) = (usize::from(*c1) * len / 256, usize::from(*c2) * len / 256);
    for cuts in [vec![a], vec![a.min(b), a.max(b)]] {
        assert_eq!(run(framing, limits, input, &cuts), whole, "cut at {cuts:?}");
    }
});
