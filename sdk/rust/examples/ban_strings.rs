//! ban_strings: keeps banned strings out of the generated text (twin of
//! guests/controllers/ban_strings.c).
//!
//! Argument: UTF-8 strings separated by `\n` (a trailing `\r` is dropped, empty lines
//! are skipped): 1 to 64 strings of 1 to 64 bytes. Example: `b"password\nsecret"`.
//!
//! create: bans every non-special token whose bytes contain a banned string, in a base
//! mask grown here (`ceil(V / 32)` words, plus V words indexing the other tokens by
//! first byte). step: the first step copies the base mask into the row; later steps
//! undo the previous step's extra bans. Strings across token boundaries: with the last
//! 63 bytes of generated text kept, when they end with a proper prefix `s[..k]` of a
//! banned string the step also bans every token starting with the rest `s[k..]`, so no
//! banned string can be completed by the next token. The prompt is not checked.
#![no_std]

use wasmshare_guest::{controller, grow, mask, Controller, Create, Error, Output, Step, TokenTable};

const BAN_MAX: usize = 64;
const BAN_MAX_LEN: usize = 64;
const HIST_LEN: usize = BAN_MAX_LEN - 1;
const TMP_MAX: usize = 4096;

struct BanStrings {
    ban: [[u8; BAN_MAX_LEN]; BAN_MAX],
    ban_len: [usize; BAN_MAX],
    n_ban: usize,
    /// `order[bucket[b]..bucket[b + 1]]` start with byte b.
    bucket: [u32; 257],
    written: bool,
    hist: [u8; HIST_LEN],
    hist_len: usize,
    /// Tokens banned for the current step only.
    tmp: [u32; TMP_MAX],
    n_tmp: usize,
    tmp_overflow: bool,
}

impl BanStrings {
    fn parse(&mut self, arg: &[u8]) -> Result<(), Error> {
        for line in arg.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            if line.len() > BAN_MAX_LEN || self.n_ban == BAN_MAX {
                return Err(Error::FAILED);
            }
            self.ban[self.n_ban][..line.len()].copy_from_slice(line);
            self.ban_len[self.n_ban] = line.len();
            self.n_ban += 1;
        }
        if self.n_ban == 0 {
            return Err(Error::FAILED);
        }
        Ok(())
    }

    fn append_history(&mut self, bytes: &[u8]) {
        if bytes.len() >= HIST_LEN {
            self.hist.copy_from_slice(&bytes[bytes.len() - HIST_LEN..]);
            self.hist_len = HIST_LEN;
            return;
        }
        let keep = if self.hist_len + bytes.len() > HIST_LEN { HIST_LEN - bytes.len() } else { self.hist_len };
        let drop = self.hist_len - keep;
        self.hist.copy_within(drop..drop + keep, 0);
        self.hist[keep..keep + bytes.len()].copy_from_slice(bytes);
        self.hist_len = keep + bytes.len();
    }

    /// Bans, for this step, every allowed token whose bytes start with `rest`.
    fn ban_starting_with(&mut self, table: &TokenTable<'_>, order: &[u32], row: &mut [u32], rest: &[u8]) {
        let b = rest[0] as usize;
        for i in self.bucket[b]..self.bucket[b + 1] {
            let t = order[i as usize];
            if !mask::allowed(row, t) {
                continue;
            }
            let bytes = table.bytes(t).unwrap_or(&[]);
            if bytes.starts_with(rest) {
                mask::ban(row, t);
                if self.n_tmp < TMP_MAX {
                    self.tmp[self.n_tmp] = t;
                    self.n_tmp += 1;
                } else {
                    self.tmp_overflow = true;
                }
            }
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

// The state is large (the per-step ban list); it lives in a zeroed static rather than
// on the 64 KiB stack. One instance per sequence, so this static is that sequence's.
static mut STATE: BanStrings = BanStrings {
    ban: [[0; BAN_MAX_LEN]; BAN_MAX],
    ban_len: [0; BAN_MAX],
    n_ban: 0,
    bucket: [0; 257],
    written: false,
    hist: [0; HIST_LEN],
    hist_len: 0,
    tmp: [0; TMP_MAX],
    n_tmp: 0,
    tmp_overflow: false,
};

/// The controller proper: `STATE` and the two tables grown at create.
struct Controlled {
    s: &'static mut BanStrings,
    /// Allowed unless a token contains a banned string (mask_words).
    base: &'static mut [u32],
    /// Candidate tokens (allowed, not special, not empty) by first byte.
    order: &'static mut [u32],
}

impl Controller for Controlled {
    fn create(ctx: &mut Create<'_>) -> Result<Self, Error> {
        // SAFETY: create runs once per instance, before any step; nothing else holds STATE.
        let s = unsafe { &mut *core::ptr::addr_of_mut!(STATE) };
        s.n_ban = 0;
        s.parse(ctx.arg())?;
        let table = ctx.token_table()?;
        let v = ctx.vocab_size();
        let words = ctx.mask().len();
        if table.len() < v || words < ((v + 31) / 32) as usize || v > 1 << 24 {
            return Err(Error::FAILED);
        }
        let base = grow::<u32>(words).ok_or(Error::FAILED)?;
        let order = grow::<u32>(v as usize).ok_or(Error::FAILED)?;
        mask::fill(base);
        for t in v..(words as u32) * 32 {
            mask::ban(base, t); // bits past V stay clear
        }
        s.bucket = [0; 257];
        for token in table.iter().take(v as usize) {
            if token.special {
                continue;
            }
            let banned = (0..s.n_ban).any(|i| contains(token.bytes, &s.ban[i][..s.ban_len[i]]));
            if banned {
                mask::ban(base, token.id);
            } else if let Some(&first) = token.bytes.first() {
                s.bucket[first as usize + 1] += 1;
            }
        }
        for b in 0..256 {
            s.bucket[b + 1] += s.bucket[b];
        }
        // Counting sort: bucket[b] is the next free place of bucket b while filling.
        for token in table.iter().take(v as usize) {
            if token.special || !mask::allowed(base, token.id) {
                continue;
            }
            if let Some(&first) = token.bytes.first() {
                order[s.bucket[first as usize] as usize] = token.id;
                s.bucket[first as usize] += 1;
            }
        }
        s.bucket.copy_within(0..256, 1);
        s.bucket[0] = 0;
        s.written = false;
        s.hist_len = 0;
        s.n_tmp = 0;
        s.tmp_overflow = false;
        Ok(Controlled { s, base, order })
    }

    fn step(&mut self, step: &mut Step<'_>) -> Result<(), Error> {
        let s = &mut *self.s;
        let table = step.token_table()?;
        let row = step.mask();
        // Undo the previous step's boundary bans (or write the whole base mask).
        if !s.written || s.tmp_overflow {
            row.copy_from_slice(&self.base[..row.len()]);
            s.written = true;
        } else {
            for &t in &s.tmp[..s.n_tmp] {
                mask::allow(row, t);
            }
        }
        s.n_tmp = 0;
        s.tmp_overflow = false;
        for &t in step.sampled() {
            if table.is_special(t) {
                continue;
            }
            if let Some(bytes) = table.bytes(t) {
                s.append_history(bytes);
            }
        }
        let row = step.mask();
        for i in 0..s.n_ban {
            let (ban, n) = (s.ban[i], s.ban_len[i]);
            for k in 1..n.min(s.hist_len + 1) {
                if s.hist[s.hist_len - k..s.hist_len] == ban[..k] {
                    s.ban_starting_with(&table, self.order, row, &ban[k..n]);
                }
            }
        }
        step.answer(Output::Bitmask);
        Ok(())
    }
}

controller!(Controlled);
