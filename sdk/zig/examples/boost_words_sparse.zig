//! boost_words_sparse: adds a logit bias to whole-word tokens, answered as sparse
//! (token, value) pairs; the twin of guests/controllers/boost_words_sparse.c (same
//! argument, same rejections, same pairs in the same order).
//!
//! Argument: lines `word<TAB>bias` separated by `\n` (a trailing `\r` is dropped, empty
//! lines are skipped), at most 256 lines; the word is 1 to 255 bytes, the bias a decimal
//! float: optional sign, digits with an optional `.`, optional exponent (`2.5`, `-1`,
//! `.5`, `1e-2`). Example: `"hello\t2.5\nworld\t-1\n"`.
//!
//! create: writes one (token, bias) pair per non-special token whose bytes equal a word or
//!         `" " + word` (the leading-space variant BPE vocabularies use), in token order;
//!         when a token matches several lines the last one wins. More matching tokens
//!         than the slot holds pairs (V / 2) fails create.
//! step:   answers `sparse_bias` with their count without touching the slot, which keeps
//!         its contents between steps: the host adds a few values per step instead of a
//!         whole V-entry row.
const std = @import("std");
const ws = @import("wasmshare");

const boost_max = 256;
const boost_max_len = 255;

const Word = struct { word: []const u8, bias: f32 };

fn isDigit(c: u8) bool {
    return c >= '0' and c <= '9';
}

/// Parses a decimal float filling all of `s`; `null` when malformed or out of range. The
/// same arithmetic as the C twin's parse_float (f64 digits, exponent applied by repeated
/// multiplication, then one rounding to f32), so both give bit-identical values.
fn parseFloat(s: []const u8) ?f32 {
    var i: usize = 0;
    var negative = false;
    if (i < s.len and (s[i] == '+' or s[i] == '-')) {
        negative = s[i] == '-';
        i += 1;
    }
    var value: f64 = 0.0;
    var digits: usize = 0;
    while (i < s.len and isDigit(s[i])) : (i += 1) {
        value = value * 10.0 + @as(f64, @floatFromInt(s[i] - '0'));
        digits += 1;
    }
    if (i < s.len and s[i] == '.') {
        i += 1;
        var scale: f64 = 0.1;
        while (i < s.len and isDigit(s[i])) : (i += 1) {
            value += @as(f64, @floatFromInt(s[i] - '0')) * scale;
            scale *= 0.1;
            digits += 1;
        }
    }
    if (digits == 0) return null;
    if (i < s.len and (s[i] == 'e' or s[i] == 'E')) {
        i += 1;
        var exp_negative = false;
        if (i < s.len and (s[i] == '+' or s[i] == '-')) {
            exp_negative = s[i] == '-';
            i += 1;
        }
        var exponent: i32 = 0;
        var exp_digits: usize = 0;
        while (i < s.len and isDigit(s[i])) : (i += 1) {
            if (exponent < 1000) exponent = exponent * 10 + @as(i32, s[i] - '0');
            exp_digits += 1;
        }
        if (exp_digits == 0) return null;
        var e: i32 = 0;
        while (e < exponent and value != 0.0) : (e += 1) {
            value = if (exp_negative) value / 10.0 else value * 10.0;
        }
    }
    if (i != s.len) return null;
    const f: f32 = @floatCast(if (negative) -value else value);
    return if (std.math.isFinite(f)) f else null;
}

/// The parsed lines; the words are slices of the argument, which is valid during create only.
var words_buf: [boost_max]Word = undefined;

/// Parses the argument into `words_buf`; the words, or an error when malformed.
fn parseArg(a: []const u8) ![]const Word {
    var n: usize = 0;
    var lines = std.mem.splitScalar(u8, a, '\n');
    while (lines.next()) |raw| {
        const line = if (raw.len > 0 and raw[raw.len - 1] == '\r') raw[0 .. raw.len - 1] else raw;
        if (line.len == 0) continue;
        const tab = std.mem.indexOfScalar(u8, line, '\t') orelse return error.BadArgument;
        const word = line[0..tab];
        if (word.len == 0 or word.len > boost_max_len or n == boost_max) return error.BadArgument;
        words_buf[n] = .{ .word = word, .bias = parseFloat(line[tab + 1 ..]) orelse return error.BadArgument };
        n += 1;
    }
    if (n == 0) return error.BadArgument;
    return words_buf[0..n];
}

/// Whether a token's bytes are `word` or `" " + word`.
fn matches(bytes: []const u8, word: []const u8) bool {
    return std.mem.eql(u8, bytes, word) or
        (bytes.len == word.len + 1 and bytes[0] == ' ' and std.mem.eql(u8, bytes[1..], word));
}

const BoostWordsSparse = struct {
    n_bias: u32,

    pub fn create(ctx: *ws.Create) !BoostWordsSparse {
        const words = try parseArg(ctx.arg());
        const table = try ctx.tokenTable();
        const v = ctx.vocabSize();
        if (table.len() < v) return error.BadTable;
        const pairs = ctx.sparseBias();
        const ids = pairs.ids;
        const values = pairs.values;
        var n: usize = 0;
        var it = table.iterator();
        while (it.next()) |tok| {
            if (tok.id >= v) break;
            if (tok.special) continue;
            var last: ?usize = null;
            for (words, 0..) |w, i| {
                if (matches(tok.bytes, w.word)) last = i;
            }
            const w = last orelse continue;
            if (n == ids.len) return error.TooManyPairs; // more matching tokens than the slot holds
            ids[n] = tok.id;
            values[n] = words[w].bias;
            n += 1;
        }
        return .{ .n_bias = @intCast(n) };
    }

    pub fn step(self: *BoostWordsSparse, s: *ws.Step) !void {
        s.answer(.{ .sparse_bias = self.n_bias });
    }
};

/// A failed safety check traps at once; like the C twin, the module imports nothing.
pub const panic = ws.trap_panic;

comptime {
    ws.exportController(BoostWordsSparse);
}
