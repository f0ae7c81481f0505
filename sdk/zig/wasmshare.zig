//! wasmshare guests in Zig: the memory a host lends into this guest, as slices.
//!
//! The host maps shared memory into this guest's linear memory and passes a (pointer,
//! length) window; these functions give it back as the slice it is: `[]u32` for the mask
//! row, `[]f32` for the bias row, `[]const u32` for the sampled tokens, and the token
//! table as a bounds-checked view with an iterator. Nothing is copied: writing
//! `mask(in)[3] = 0` writes the host's batch tensor. Writing a read-only window traps, and
//! so does a failed safety check (an out-of-bounds index, an overflow, `unreachable`) in the
//! default ReleaseSafe build, so a bug ends this guest and nothing else.
//!
//! A controller is a type with `create(*Create) !T` and `step(*T, *Step) !void`, exported
//! with `comptime { ws.exportController(T); }`; see docs/guests.md and docs/controller-abi.md.

const std = @import("std");

/// Version of the core ABI (`ws_abi_version`).
pub const abi_version: i32 = 1;
/// Version of the controller ABI (`ws_ctrl_abi_version`).
pub const controller_abi_version: i32 = 1;
/// Size of a wasm page, and the alignment of every loan window.
pub const page_size: usize = 65536;
/// Capacity of a step result's fast-forward list.
pub const max_ff_tokens: usize = 1024;
/// Token flag: a special token (end of sequence, ...), whose bytes are not text.
pub const token_special: u8 = 1;
/// `"WSTT"` little-endian, the token table's magic.
pub const token_table_magic: u32 = 0x54545357;
/// An absent token id.
pub const no_token: u32 = 0xFFFFFFFF;

/// Status codes the host understands (`WS_OK`, `WS_ERR_*`).
pub const ok: i32 = 0;
pub const err_bad_handle: i32 = -1;
pub const err_access: i32 = -2;
pub const err_not_borrowed: i32 = -3;
pub const err_failed: i32 = -4;

/// Header of the token table loan (64 bytes, read-only).
pub const TokenTableHeader = extern struct {
    struct_size: u32,
    magic: u32,
    version: u32,
    n_tokens: u32,
    offsets_offset: u32,
    flags_offset: u32,
    bytes_offset: u32,
    bytes_len: u32,
    eos_token: u32,
    bos_token: u32,
    reserved: [6]u32,
};

/// What the host tells a controller each call (68 bytes, host-written).
pub const StepInput = extern struct {
    struct_size: u32,
    abi_version: u32,
    vocab_size: u32,
    mask_words: u32,
    token_table: ?*const TokenTableHeader,
    mask: ?[*]u32,
    bias: ?[*]f32,
    step: u32,
    n_tokens: u32,
    tokens: ?[*]const u32,
    arg: ?[*]const u8,
    arg_len: u32,
    sequence_id: u32,
    reserved: [4]u32,
};

/// What a controller answers (4128 bytes; the host resets it before each call).
pub const StepResult = extern struct {
    struct_size: u32,
    action: i32,
    output: i32,
    backtrack: u32,
    n_ff: u32,
    n_bias: u32,
    reserved: [2]u32,
    ff_tokens: [max_ff_tokens]u32,
};

comptime {
    // The layouts of docs/controller-abi.md.
    std.debug.assert(@sizeOf(TokenTableHeader) == 64);
    std.debug.assert(@sizeOf(StepInput) == 68);
    std.debug.assert(@offsetOf(StepInput, "token_table") == 16);
    std.debug.assert(@offsetOf(StepInput, "sequence_id") == 48);
    std.debug.assert(@sizeOf(StepResult) == 32 + 4 * max_ff_tokens);
    std.debug.assert(@offsetOf(StepResult, "ff_tokens") == 32);
}

/// What the next token is sampled under (`out->output`).
pub const Output = union(enum) {
    none,
    bitmask,
    bias,
    /// The first `n` pairs of the sparse-bias view.
    sparse_bias: u32,
};

// ---- slices over the lent windows --------------------------------------------------

fn window(comptime T: type, ptr: ?[*]T, len: usize) []T {
    const p = ptr orelse return &[_]T{};
    return p[0..len];
}

fn constWindow(comptime T: type, ptr: ?[*]const T, len: usize) []const T {
    const p = ptr orelse return &[_]T{};
    return p[0..len];
}

/// The mask row, `ceil(V / 32)` words: bit `t % 32` of word `t / 32` set = token t allowed.
pub fn mask(in: *const StepInput) []u32 {
    return window(u32, in.mask, in.mask_words);
}

/// The bias row, V floats, added to the logits.
pub fn bias(in: *const StepInput) []f32 {
    return window(f32, in.bias, in.vocab_size);
}

/// The sparse-bias ids: the first `V / 2` entries of the bias slot, read as `u32`.
pub fn sparseIds(in: *const StepInput) []u32 {
    const p: ?[*]u32 = if (in.bias) |b| @ptrCast(b) else null;
    return window(u32, p, in.vocab_size / 2);
}

/// The sparse-bias values: `V / 2` floats from entry `V / 2` of the bias slot on.
pub fn sparseValues(in: *const StepInput) []f32 {
    const p: ?[*]f32 = if (in.bias) |b| b + in.vocab_size / 2 else null;
    return window(f32, p, in.vocab_size / 2);
}

/// Create: the prompt; step: the tokens sampled since the previous step.
pub fn tokens(in: *const StepInput) []const u32 {
    return constWindow(u32, in.tokens, in.n_tokens);
}

/// The controller's argument bytes (create only).
pub fn arg(in: *const StepInput) []const u8 {
    return constWindow(u8, in.arg, in.arg_len);
}

/// Ban every token.
pub fn maskClear(m: []u32) void {
    @memset(m, 0);
}

/// Allow every token (bits past V are ignored by the host).
pub fn maskFill(m: []u32) void {
    @memset(m, 0xFFFFFFFF);
}

/// Allow token `t` (ids past the row are ignored).
pub fn maskAllow(m: []u32, t: u32) void {
    if (t / 32 < m.len) m[t / 32] |= @as(u32, 1) << @intCast(t % 32);
}

/// Ban token `t` (ids past the row are ignored).
pub fn maskBan(m: []u32, t: u32) void {
    if (t / 32 < m.len) m[t / 32] &= ~(@as(u32, 1) << @intCast(t % 32));
}

/// Whether token `t` is allowed (false past the row).
pub fn maskAllowed(m: []const u32, t: u32) bool {
    return t / 32 < m.len and (m[t / 32] >> @intCast(t % 32)) & 1 != 0;
}

// ---- the token table ----------------------------------------------------------------

/// The tokenizer's vocabulary, read in place; every token's bytes are bounds-checked
/// against the table's own sizes, so a malformed table gives `null`, never a wild read.
pub const TokenTable = struct {
    offsets: []const u32,
    flags: []const u8,
    data: []const u8,
    eos_token: u32,
    bos_token: u32,

    /// Number of tokens V.
    pub fn len(self: TokenTable) u32 {
        return @intCast(self.flags.len);
    }

    /// The bytes token `t` decodes to; `null` out of range or for offsets outside the table.
    pub fn bytes(self: TokenTable, t: u32) ?[]const u8 {
        if (@as(usize, t) + 1 >= self.offsets.len) return null;
        const start = self.offsets[t];
        const end = self.offsets[t + 1];
        if (start > end or end > self.data.len) return null;
        return self.data[start..end];
    }

    /// Whether token `t` is special (its bytes are not text); false out of range.
    pub fn isSpecial(self: TokenTable, t: u32) bool {
        return t < self.flags.len and self.flags[t] & token_special != 0;
    }

    /// The end-of-sequence token, if any.
    pub fn eos(self: TokenTable) ?u32 {
        return if (self.eos_token == no_token) null else self.eos_token;
    }

    /// Every token in id order: `while (it.next()) |tok| ...`.
    pub fn iterator(self: TokenTable) Iterator {
        return .{ .table = self, .next_id = 0 };
    }

    /// One entry of the table.
    pub const Token = struct { id: u32, bytes: []const u8, special: bool };

    /// Iterator over the tokens.
    pub const Iterator = struct {
        table: TokenTable,
        next_id: u32,

        pub fn next(self: *Iterator) ?Token {
            const id = self.next_id;
            if (id >= self.table.len()) return null;
            self.next_id += 1;
            return .{ .id = id, .bytes = self.table.bytes(id) orelse &[_]u8{}, .special = self.table.isSpecial(id) };
        }
    };
};

/// The token table of `in`, after checking its magic, version and layout.
pub fn tokenTable(in: *const StepInput) error{BadTokenTable}!TokenTable {
    const h = in.token_table orelse return error.BadTokenTable;
    if (h.magic != token_table_magic or h.version != 1 or h.struct_size < @sizeOf(TokenTableHeader))
        return error.BadTokenTable;
    if (h.offsets_offset % 4 != 0) return error.BadTokenTable;
    const base: [*]const u8 = @ptrCast(h);
    const n: usize = h.n_tokens;
    const offsets: [*]const u32 = @ptrCast(@alignCast(base + h.offsets_offset));
    return .{
        .offsets = offsets[0 .. n + 1],
        .flags = (base + h.flags_offset)[0..n],
        .data = (base + h.bytes_offset)[0..h.bytes_len],
        .eos_token = h.eos_token,
        .bos_token = h.bos_token,
    };
}

// ---- memory -------------------------------------------------------------------------

/// Grow linear memory by enough pages for `count` zeroed `T` and return them (create only:
/// a step must not allocate); `null` when memory cannot grow. The pages are never given back.
pub fn grow(comptime T: type, count: usize) ?[]T {
    const nbytes = std.math.mul(usize, count, @sizeOf(T)) catch return null;
    if (nbytes == 0) return &[_]T{};
    const pages = (nbytes + page_size - 1) / page_size;
    const old = @wasmMemoryGrow(0, pages);
    if (old < 0) return null;
    const p: [*]T = @ptrFromInt(@as(usize, @intCast(old)) * page_size);
    return p[0..count];
}

// ---- host imports (module "wasmshare") ------------------------------------------------

/// The raw imports, as `wasmshare.h` and `wasmshare_controller.h` declare them. A module
/// imports only what it calls.
pub const sys = struct {
    pub extern "wasmshare" fn ws_borrow(handle: i32, access: i32) i32;
    pub extern "wasmshare" fn ws_release(handle: i32) i32;
    pub extern "wasmshare" fn ws_region_size(handle: i32) i64;
    pub extern "wasmshare" fn ws_log(msg: [*]const u8, len: i32) void;
    pub extern "wasmshare" fn ws_constraint_open(kind: i32, spec: [*]const u8, len: i32) i32;
    pub extern "wasmshare" fn ws_constraint_fill_mask(handle: i32, m: [*]u32, words: i32) i32;
    pub extern "wasmshare" fn ws_constraint_consume(handle: i32, token: u32) i32;
    pub extern "wasmshare" fn ws_constraint_is_accepting(handle: i32) i32;
    pub extern "wasmshare" fn ws_constraint_is_stopped(handle: i32) i32;
    pub extern "wasmshare" fn ws_constraint_close(handle: i32) i32;
};

/// Log `msg` on the host, tagged with the guest's name.
pub fn log(msg: []const u8) void {
    sys.ws_log(msg.ptr, @intCast(@min(msg.len, std.math.maxInt(i32))));
}

/// How a region is borrowed.
pub const Access = enum(i32) { read_only = 1, read_write = 2 };

/// Map the region offered under `handle`; the slice is valid until `release(handle)` or
/// until the outermost host call into the guest returns. Writing a read-only one traps.
pub fn borrow(handle: i32, access: Access) error{ BadHandle, BorrowFailed }![]u8 {
    const size = sys.ws_region_size(handle);
    if (size < 0) return error.BadHandle;
    const addr = sys.ws_borrow(handle, @intFromEnum(access));
    if (addr == 0) return error.BorrowFailed;
    const p: [*]u8 = @ptrFromInt(@as(usize, @as(u32, @bitCast(addr))));
    return p[0..@intCast(size)];
}

/// End a borrow early.
pub fn release(handle: i32) void {
    _ = sys.ws_release(handle);
}

/// Kinds of constraint the host's grammar engine compiles.
pub const ConstraintKind = enum(i32) { json_schema = 1, regex = 2, grammar = 3, choice = 4, stop = 5 };

/// A constraint compiled by the host (`ws_constraint_*`).
pub const Constraint = struct {
    handle: i32,

    /// Compile `spec` (cached by the host by spec and tokenizer).
    pub fn open(kind: ConstraintKind, spec: []const u8) error{BadSpec}!Constraint {
        const h = sys.ws_constraint_open(@intFromEnum(kind), spec.ptr, @intCast(spec.len));
        return if (h > 0) .{ .handle = h } else error.BadSpec;
    }

    /// Have the host write the mask of the current state into `m` (the mask row).
    pub fn fillMask(self: Constraint, m: []u32) error{ConstraintFailed}!void {
        if (sys.ws_constraint_fill_mask(self.handle, m.ptr, @intCast(m.len)) < 0) return error.ConstraintFailed;
    }

    /// Advance by a sampled token; an error when the constraint does not allow it.
    pub fn consume(self: Constraint, token: u32) error{Rejected}!void {
        if (sys.ws_constraint_consume(self.handle, token) < 0) return error.Rejected;
    }

    /// Whether the text so far is a complete match.
    pub fn isAccepting(self: Constraint) bool {
        return sys.ws_constraint_is_accepting(self.handle) == 1;
    }

    /// Whether nothing but end-of-sequence may follow.
    pub fn isStopped(self: Constraint) bool {
        return sys.ws_constraint_is_stopped(self.handle) == 1;
    }

    /// Forget the constraint.
    pub fn close(self: Constraint) void {
        _ = sys.ws_constraint_close(self.handle);
    }
};

// ---- controllers --------------------------------------------------------------------

/// What `create` sees: the argument, the prompt, the vocabulary and the output slots.
pub const Create = struct {
    in: *const StepInput,
};

/// What a step sees and answers.
pub const Step = struct {
    in: *const StepInput,
    out: *StepResult,

    /// Sample the next token under `output`.
    pub fn answer(self: *Step, output: Output) void {
        self.out.output = switch (output) {
            .none => 0,
            .bitmask => 1,
            .bias => 2,
            .sparse_bias => 3,
        };
        self.out.n_bias = switch (output) {
            .sparse_bias => |n| n,
            else => 0,
        };
    }

    /// End the sequence after this step.
    pub fn stop(self: *Step) void {
        self.out.action = 1;
    }

    /// Remove `n` tokens from the end before fast-forwarding.
    pub fn backtrack(self: *Step, n: u32) void {
        self.out.backtrack = n;
    }

    /// Append `toks` without sampling; an error past `max_ff_tokens`.
    pub fn fastForward(self: *Step, toks: []const u32) error{TooManyTokens}!void {
        if (toks.len > max_ff_tokens) return error.TooManyTokens;
        @memcpy(self.out.ff_tokens[0..toks.len], toks);
        self.out.n_ff = @intCast(toks.len);
    }
};

/// Export `ws_abi_version` (every wasmshare guest; the host checks it first).
pub fn exportAbiVersion() void {
    const S = struct {
        fn version() callconv(.c) i32 {
            return abi_version;
        }
    };
    @export(&S.version, .{ .name = "ws_abi_version" });
}

/// Export controller type `T` as this module's controller (the `ws_ctrl_*` functions).
///
/// `T.create(*Create) !T` parses the argument and prepares, once; an error fails the
/// sequence before it starts. `T.step(*T, *Step) !void` answers one step; an error ends
/// the sequence with `err_failed`. Each sequence has its own instance of the module, so the
/// one `T` value kept here is that sequence's state. Use it in a `comptime` block.
pub fn exportController(comptime T: type) void {
    exportAbiVersion();
    const S = struct {
        var state: ?T = null;

        fn ctrlAbiVersion() callconv(.c) i32 {
            return controller_abi_version;
        }

        fn create(in: ?*const StepInput, out: ?*StepResult) callconv(.c) i32 {
            _ = out; // reserved at create: the host ignores it
            var ctx = Create{ .in = in orelse return err_failed };
            state = T.create(&ctx) catch return err_failed;
            return ok;
        }

        fn step(in: ?*const StepInput, out: ?*StepResult) callconv(.c) i32 {
            if (state == null) return err_failed;
            var s = Step{ .in = in orelse return err_failed, .out = out orelse return err_failed };
            state.?.step(&s) catch return err_failed;
            return ok;
        }

        fn free() callconv(.c) void {
            state = null;
        }
    };
    @export(&S.ctrlAbiVersion, .{ .name = "ws_ctrl_abi_version" });
    @export(&S.create, .{ .name = "ws_ctrl_create" });
    @export(&S.step, .{ .name = "ws_ctrl_step" });
    @export(&S.free, .{ .name = "ws_ctrl_free" });
}
