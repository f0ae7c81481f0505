//! boost_words_sparse: adds a logit bias to whole-word tokens, answered as sparse
//! (token, value) pairs (twin of guests/controllers/boost_words_sparse.c).
//!
//! Argument: lines `word<TAB>bias` separated by `\n` (a trailing `\r` is dropped, empty
//! lines are skipped), at most 256 lines; the word is 1 to 255 bytes, the bias a decimal
//! float: optional sign, digits with an optional `.`, optional exponent (`2.5`, `-1`,
//! `.5`, `1e-2`). Example: `b"hello\t2.5\nworld\t-1\n"`.
//!
//! create: one pair per non-special token whose bytes equal a word or `" " + word` (the
//! leading-space variant BPE vocabularies use); when a token matches several lines, the
//! last one wins. Steps answer `SparseBias(n)` without touching the slot, which keeps
//! its contents between steps: the host adds a few values instead of a V-entry row.
#![no_std]

use wasmshare_guest::{controller, Controller, Create, Error, Output, Step};

const BOOST_MAX: usize = 256;
const BOOST_MAX_LEN: usize = 255;

/// One argument line: the word and the bias its tokens get.
#[derive(Clone, Copy)]
struct Word<'a> {
    word: &'a [u8],
    bias: f32,
}

/// Parses a decimal float filling all of `s`; `None` when malformed or out of range.
fn parse_float(s: &[u8]) -> Option<f32> {
    let mut i = 0;
    let mut negative = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        negative = s[i] == b'-';
        i += 1;
    }
    let mut value = 0.0f64;
    let mut digits = 0;
    while i < s.len() && s[i].is_ascii_digit() {
        value = value * 10.0 + f64::from(s[i] - b'0');
        i += 1;
        digits += 1;
    }
    if i < s.len() && s[i] == b'.' {
        i += 1;
        let mut scale = 0.1f64;
        while i < s.len() && s[i].is_ascii_digit() {
            value += f64::from(s[i] - b'0') * scale;
            scale *= 0.1;
            i += 1;
            digits += 1;
        }
    }
    if digits == 0 {
        return None;
    }
    if i < s.len() && (s[i] == b'e' || s[i] == b'E') {
        i += 1;
        let mut exp_negative = false;
        if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
            exp_negative = s[i] == b'-';
            i += 1;
        }
        let mut exponent = 0i32;
        let mut exp_digits = 0;
        while i < s.len() && s[i].is_ascii_digit() {
            if exponent < 1000 {
                exponent = exponent * 10 + i32::from(s[i] - b'0');
            }
            i += 1;
            exp_digits += 1;
        }
        if exp_digits == 0 {
            return None;
        }
        let mut e = 0;
        while e < exponent && value != 0.0 {
            value = if exp_negative { value / 10.0 } else { value * 10.0 };
            e += 1;
        }
    }
    if i != s.len() {
        return None;
    }
    let f = (if negative { -value } else { value }) as f32;
    f.is_finite().then(|| f)
}

/// Parses the argument into `words`; the count, or `None` when malformed.
fn parse_arg<'a>(arg: &'a [u8], words: &mut [Word<'a>; BOOST_MAX]) -> Option<usize> {
    let mut n = 0;
    for line in arg.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let tab = line.iter().position(|&b| b == b'\t')?;
        let word = &line[..tab];
        if word.is_empty() || word.len() > BOOST_MAX_LEN || n == BOOST_MAX {
            return None;
        }
        words[n] = Word { word, bias: parse_float(&line[tab + 1..])? };
        n += 1;
    }
    (n > 0).then(|| n)
}

struct BoostWordsSparse {
    /// Pairs written at create.
    n_bias: u32,
}

impl Controller for BoostWordsSparse {
    fn create(ctx: &mut Create<'_>) -> Result<Self, Error> {
        let arg = ctx.arg();
        let mut words = [Word { word: &[], bias: 0.0 }; BOOST_MAX];
        let n_words = parse_arg(arg, &mut words).ok_or(Error::FAILED)?;
        let words = &words[..n_words];
        let table = ctx.token_table()?;
        let v = ctx.vocab_size();
        if table.len() < v {
            return Err(Error::FAILED);
        }
        let pairs = ctx.sparse_bias();
        let mut n = 0usize;
        for token in table.iter().take(v as usize) {
            if token.special {
                continue;
            }
            let bytes = token.bytes;
            let matching = words.iter().rev().find(|w| {
                bytes == w.word || (bytes.len() == w.word.len() + 1 && bytes[0] == b' ' && &bytes[1..] == w.word)
            });
            if let Some(w) = matching {
                if n == pairs.ids.len() {
                    return Err(Error::FAILED); // more matching tokens than the slot holds pairs
                }
                pairs.ids[n] = token.id;
                pairs.values[n] = w.bias;
                n += 1;
            }
        }
        Ok(BoostWordsSparse { n_bias: n as u32 })
    }

    fn step(&mut self, step: &mut Step<'_>) -> Result<(), Error> {
        step.answer(Output::SparseBias(self.n_bias));
        Ok(())
    }
}

controller!(BoostWordsSparse);
