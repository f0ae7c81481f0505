//! hostile: a Rust controller that misbehaves on purpose, for the host's tests.
//!
//! Argument: a mode name. `ok`: allow every token. `panic_at_create`: panic in create.
//! `panic`: panic at the second step. `out_of_bounds`: index the mask row past its end
//! at the first step (Rust's bounds check panics). `write_token_table`: write through
//! the read-only token table loan (the mapping traps). Anything else fails create.
#![no_std]

use wasmshare_guest::{controller, mask, Controller, Create, Error, Output, Step};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ok,
    Panic,
    OutOfBounds,
    WriteTokenTable,
}

struct Hostile {
    mode: Mode,
}

impl Controller for Hostile {
    fn create(ctx: &mut Create<'_>) -> Result<Self, Error> {
        let mode = match ctx.arg() {
            b"ok" => Mode::Ok,
            b"panic" => Mode::Panic,
            b"out_of_bounds" => Mode::OutOfBounds,
            b"write_token_table" => Mode::WriteTokenTable,
            b"panic_at_create" => panic!("asked to"),
            _ => return Err(Error::FAILED),
        };
        Ok(Hostile { mode })
    }

    fn step(&mut self, step: &mut Step<'_>) -> Result<(), Error> {
        let index = step.index();
        let vocab = step.vocab_size() as usize;
        match self.mode {
            Mode::Ok => {}
            Mode::Panic if index >= 1 => panic!("step {}", index),
            Mode::Panic => {}
            Mode::OutOfBounds => {
                let row = step.mask();
                let past = row.len() + vocab; // a guest-computed index from bad arithmetic
                row[past] = 0;
            }
            Mode::WriteTokenTable => {
                let table = step.token_table()?;
                let first = table.bytes(0).ok_or(Error::FAILED)?;
                // SAFETY: none: the table is mapped read-only, so the host traps this store.
                unsafe { core::ptr::write_volatile(first.as_ptr() as *mut u8, 0) };
            }
        }
        mask::fill(step.mask());
        step.answer(Output::Bitmask);
        Ok(())
    }
}

controller!(Hostile);
