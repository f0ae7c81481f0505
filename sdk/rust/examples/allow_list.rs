//! allow_list: a controller that only ever allows a fixed set of tokens (twin of
//! guests/controllers/allow_list.c).
//!
//! Argument: little-endian u32 token ids, `arg.len() / 4` of them (at least one, each
//! below V, at most 65536). Example (Python): `struct.pack("<3I", 5, 17, 42)`.
//! The first step clears the mask row and allows exactly these ids; later steps
//! answer `Bitmask` without touching the row, which keeps its contents between
//! steps, so a step costs a few instructions.
#![no_std]

use wasmshare_guest::{controller, mask, Controller, Create, Error, Output, Step};

const ALLOW_MAX: usize = 65536;

static mut IDS: [u32; ALLOW_MAX] = [0; ALLOW_MAX];

struct AllowList {
    ids: &'static [u32],
    written: bool,
}

impl Controller for AllowList {
    fn create(ctx: &mut Create<'_>) -> Result<Self, Error> {
        let arg = ctx.arg();
        if arg.is_empty() || arg.len() % 4 != 0 || arg.len() / 4 > ALLOW_MAX {
            return Err(Error::FAILED);
        }
        // SAFETY: one instance per sequence and one call at a time: nothing else
        // refers to IDS while create fills it.
        let ids = unsafe { &mut *core::ptr::addr_of_mut!(IDS) };
        let n = arg.len() / 4;
        for (slot, word) in ids[..n].iter_mut().zip(arg.chunks_exact(4)) {
            let id = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            if id >= ctx.vocab_size() {
                return Err(Error::FAILED);
            }
            *slot = id;
        }
        Ok(AllowList { ids: &ids[..n], written: false })
    }

    fn step(&mut self, step: &mut Step<'_>) -> Result<(), Error> {
        if !self.written {
            let row = step.mask();
            mask::clear(row);
            for &id in self.ids {
                mask::allow(row, id);
            }
            self.written = true;
        }
        step.answer(Output::Bitmask);
        Ok(())
    }
}

controller!(AllowList);
