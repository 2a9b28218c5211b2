//! The webhook body: serialised once, JS-stable, then signed and sent as the same bytes.
//!
//! Many Node.js receivers verify the signature over `JSON.stringify(req.body)` instead of
//! the raw body. For such a receiver to agree with us, the bytes we produce must be a fixed
//! point of `JSON.stringify(JSON.parse(_))`. serde_json's own output is not: it prints
//! `10.0` where JavaScript prints `10`, `1e16` where JavaScript prints `10000000000000000`,
//! and keeps integer-like object keys in insertion order where JavaScript sorts them first.
//! [`WebhookBody::new`] writes the JSON itself with JavaScript's rules:
//!
//! * numbers are printed as `Number.prototype.toString` prints them;
//! * in objects, keys that are array indices (`"0"`, `"17"`, …) come first in ascending
//!   numeric order, then the other keys in the order the data serialised them;
//! * strings are escaped as `JSON.stringify` escapes them (`"`, `\`, control characters;
//!   `/` and non-ASCII are left as they are).
//!
//! Integers beyond ±(2^53−1) cannot survive a JavaScript receiver. They are sent unchanged
//! (the raw-body signature still verifies) and a warning is logged once per event name.

use std::collections::HashSet;
use std::fmt;
use std::io::Write as _;
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Number, Value};

/// The largest integer JavaScript represents exactly (`Number.MAX_SAFE_INTEGER`).
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// The data could not be turned into a webhook body.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// The data's `Serialize` impl failed, or produced something JSON cannot hold
    /// (a map with non-string keys, a 128-bit integer out of range, …).
    #[error("the data of event {event:?} cannot be serialised to JSON")]
    Serialize {
        /// The event being built.
        event: String,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },
}

/// The exact bytes of one webhook: compact `{"event":"<name>","data":<data>}`, keys in that
/// order, no trailing newline. An event for some apps only (an entity with
/// `#[observe(room = …)]`) also names its rooms, last:
/// `{"event":"<name>","data":<data>,"rooms":["store:1"]}` ([`WebhookBody::targeted`]).
///
/// The bytes are immutable and shared ([`Bytes`]): what [`sign`](crate::signature::sign)
/// reads is what the request sends, and no API serialises again in between.
///
/// ```
/// use vendora_observe::WebhookBody;
///
/// #[derive(serde::Serialize)]
/// struct Stock { #[serde(rename = "productId")] product_id: i32, #[serde(rename = "newStock")] new_stock: f64 }
///
/// let body = WebhookBody::new("stock:updated", &Stock { product_id: 7, new_stock: 10.0 })?;
/// // JavaScript prints 10.0 as `10`, so we do too: the body survives JSON.parse + JSON.stringify.
/// assert_eq!(body.as_str(), r#"{"event":"stock:updated","data":{"productId":7,"newStock":10}}"#);
/// # Ok::<(), vendora_observe::BodyError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookBody {
    event: Box<str>,
    bytes: Bytes,
}

impl fmt::Debug for WebhookBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookBody")
            .field("event", &self.event)
            .field("bytes", &self.as_str())
            .finish()
    }
}

impl WebhookBody {
    /// Serialises `data` once, JS-stable, under `event`.
    pub fn new<T: Serialize + ?Sized>(event: &str, data: &T) -> Result<Self, BodyError> {
        let value = serde_json::to_value(data).map_err(|source| BodyError::Serialize {
            event: event.to_owned(),
            source,
        })?;
        Ok(Self::from_value(event, &value))
    }

    /// Serialises an already built JSON value.
    pub fn from_value(event: &str, data: &Value) -> Self {
        Self::write(event, data, None)
    }

    /// An event for the apps whose scope holds one of `rooms` (and for no other app, also
    /// when `rooms` is empty): `{"event":…,"data":…,"rooms":[…]}`.
    ///
    /// ```
    /// use vendora_observe::WebhookBody;
    ///
    /// let body = WebhookBody::targeted("order:created", &serde_json::json!({"id": 7}), &["store:1"]);
    /// assert_eq!(body.as_str(), r#"{"event":"order:created","data":{"id":7},"rooms":["store:1"]}"#);
    /// ```
    pub fn targeted<R: AsRef<str>>(event: &str, data: &Value, rooms: &[R]) -> Self {
        Self::write(event, data, Some(&mut rooms.iter().map(AsRef::as_ref)))
    }

    fn write(event: &str, data: &Value, rooms: Option<&mut dyn Iterator<Item = &str>>) -> Self {
        let mut out = Vec::with_capacity(64 + event.len());
        let mut unsafe_integer = false;
        out.extend_from_slice(b"{\"event\":");
        write_str(&mut out, event);
        out.extend_from_slice(b",\"data\":");
        write_value(&mut out, data, &mut unsafe_integer);
        if let Some(rooms) = rooms {
            out.extend_from_slice(b",\"rooms\":[");
            for (i, room) in rooms.enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(&mut out, room);
            }
            out.push(b']');
        }
        out.push(b'}');
        if unsafe_integer {
            warn_unsafe_integer_once(event);
        }
        WebhookBody {
            event: event.into(),
            bytes: Bytes::from(out),
        }
    }

    /// Rebuilds a body from bytes this crate produced earlier (the outbox stores them).
    pub(crate) fn from_stored(event: &str, bytes: Vec<u8>) -> Self {
        WebhookBody {
            event: event.into(),
            bytes: Bytes::from(bytes),
        }
    }

    /// The event name (`product:created`, …).
    pub fn event(&self) -> &str {
        &self.event
    }

    /// The bytes that are signed and sent.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The body as text (it is always UTF-8 JSON).
    pub fn as_str(&self) -> &str {
        // The writer only emits UTF-8: ASCII punctuation, escaped strings and digits.
        std::str::from_utf8(&self.bytes).unwrap_or("<non-utf8 body>")
    }

    /// A cheap clone of the bytes, for the request body.
    pub(crate) fn shared_bytes(&self) -> Bytes {
        self.bytes.clone()
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true: a body always holds at least `{"event":"","data":null}`.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

fn warn_unsafe_integer_once(event: &str) {
    static WARNED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let warned = WARNED.get_or_init(Default::default);
    let first = match warned.lock() {
        Ok(mut set) => set.insert(event.to_owned()),
        Err(poisoned) => poisoned.into_inner().insert(event.to_owned()),
    };
    if first {
        tracing::warn!(
            event,
            "webhook data holds an integer beyond ±(2^53-1): it is sent unchanged, but a \
             JavaScript receiver reads it rounded and a receiver that verifies over \
             JSON.stringify(req.body) will reject the signature; send such ids as strings \
             (#[serde(with = ...)] or a String column). Logged once per event name."
        );
    }
}

fn write_value(out: &mut Vec<u8>, value: &Value, unsafe_integer: &mut bool) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(out, n, unsafe_integer),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item, unsafe_integer);
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(out, map, unsafe_integer),
    }
}

fn write_object(out: &mut Vec<u8>, map: &Map<String, Value>, unsafe_integer: &mut bool) {
    out.push(b'{');
    let mut first = true;
    let mut entry = |out: &mut Vec<u8>, key: &str, value: &Value| {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        write_str(out, key);
        out.push(b':');
        write_value(out, value, unsafe_integer);
    };
    // JavaScript enumerates array-index keys first, ascending, then the rest in insertion
    // order. Most objects have none, so only sort when there are some.
    let mut indices: Vec<(u32, &str, &Value)> = map
        .iter()
        .filter_map(|(k, v)| array_index(k).map(|i| (i, k.as_str(), v)))
        .collect();
    if indices.is_empty() {
        for (k, v) in map {
            entry(out, k, v);
        }
    } else {
        indices.sort_unstable_by_key(|(i, _, _)| *i);
        for (_, k, v) in &indices {
            entry(out, k, v);
        }
        for (k, v) in map.iter().filter(|(k, _)| array_index(k).is_none()) {
            entry(out, k, v);
        }
    }
    out.push(b'}');
}

/// `Some(i)` when `key` is an ECMAScript array index: the canonical decimal form of an
/// integer in `0..=2^32-2`.
fn array_index(key: &str) -> Option<u32> {
    let b = key.as_bytes();
    if b.is_empty() || b.len() > 10 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if b.len() > 1 && b[0] == b'0' {
        return None;
    }
    let n: u64 = key.parse().ok()?;
    (n < u64::from(u32::MAX)).then_some(n as u32)
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    // serde_json escapes exactly as JSON.stringify does for well-formed strings:
    // \" \\ \b \f \n \r \t, other controls as \u00xx (lowercase), everything else verbatim.
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn write_number(out: &mut Vec<u8>, n: &Number, unsafe_integer: &mut bool) {
    if let Some(u) = n.as_u64() {
        if u > MAX_SAFE_INTEGER {
            *unsafe_integer = true;
        }
        let _ = write!(out, "{u}");
    } else if let Some(i) = n.as_i64() {
        if i.unsigned_abs() > MAX_SAFE_INTEGER {
            *unsafe_integer = true;
        }
        let _ = write!(out, "{i}");
    } else if let Some(f) = n.as_f64() {
        write_js_f64(out, f);
    } else {
        // Only reachable with serde_json's arbitrary_precision: keep the literal.
        *unsafe_integer = true;
        out.extend_from_slice(n.to_string().as_bytes());
    }
}

/// Formats `v` exactly as JavaScript's `Number.prototype.toString()` (ECMA-262
/// Number::toString with radix 10). Non-finite values, which JSON cannot hold, become
/// `null` as `JSON.stringify` makes them.
pub(crate) fn write_js_f64(out: &mut Vec<u8>, v: f64) {
    if !v.is_finite() {
        out.extend_from_slice(b"null");
        return;
    }
    if v == 0.0 {
        // Both zeros: JSON.stringify(-0) is "0".
        out.push(b'0');
        return;
    }
    if v < 0.0 {
        out.push(b'-');
    }
    // Rust's `{:e}` prints the shortest digits that round-trip, as the spec requires:
    // "d[.ddd]e<exp>".
    let sci = format!("{:e}", v.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).collect();
    let k = digits.len() as i32;
    let n = exp + 1; // the position of the decimal point relative to the digits
    if k <= n && n <= 21 {
        out.extend_from_slice(&digits);
        out.extend(std::iter::repeat_n(b'0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        out.extend_from_slice(&digits[..n as usize]);
        out.push(b'.');
        out.extend_from_slice(&digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat_n(b'0', (-n) as usize));
        out.extend_from_slice(&digits);
    } else {
        out.push(digits[0]);
        if k > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        let e = n - 1;
        let _ = write!(
            out,
            "e{}{}",
            if e >= 0 { '+' } else { '-' },
            e.unsigned_abs()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn js(v: f64) -> String {
        let mut out = Vec::new();
        write_js_f64(&mut out, v);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn floats_print_as_javascript_prints_them() {
        // Expected strings are what node prints for `String(x)`.
        let cases: &[(f64, &str)] = &[
            (10.0, "10"),
            (-10.0, "-10"),
            (12.5, "12.5"),
            (0.1, "0.1"),
            (0.1 + 0.2, "0.30000000000000004"),
            (-0.0, "0"),
            (1e16, "10000000000000000"),
            (1e21, "1e+21"),
            (1.5e21, "1.5e+21"),
            (123456789012345680000.0, "123456789012345680000"),
            (1e-6, "0.000001"),
            (1.5e-6, "0.0000015"),
            (1e-7, "1e-7"),
            (1.2345e-7, "1.2345e-7"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (f64::MIN_POSITIVE, "2.2250738585072014e-308"),
            (9007199254740993.0, "9007199254740992"),
            (f64::NAN, "null"),
            (f64::INFINITY, "null"),
        ];
        for (v, want) in cases {
            assert_eq!(js(*v), *want, "for {v:?}");
        }
    }

    #[test]
    fn body_is_compact_with_event_first() {
        let b = WebhookBody::new("product:deleted", &json!({"id": 3})).unwrap();
        assert_eq!(b.as_str(), r#"{"event":"product:deleted","data":{"id":3}}"#);
        assert_eq!(b.event(), "product:deleted");
    }

    #[test]
    fn rooms_come_last_and_only_for_targeted_events() {
        let data = json!({"id": 3, "storeId": 1});
        let b = WebhookBody::targeted("order:updated", &data, &["store:1", "hq \"north\""]);
        assert_eq!(
            b.as_str(),
            r#"{"event":"order:updated","data":{"id":3,"storeId":1},"rooms":["store:1","hq \"north\""]}"#
        );
        let none: [&str; 0] = [];
        assert_eq!(
            WebhookBody::targeted("order:updated", &data, &none).as_str(),
            r#"{"event":"order:updated","data":{"id":3,"storeId":1},"rooms":[]}"#
        );
        assert_eq!(
            WebhookBody::from_value("order:updated", &data).as_str(),
            r#"{"event":"order:updated","data":{"id":3,"storeId":1}}"#
        );
    }

    #[test]
    fn integer_like_keys_come_first_in_numeric_order() {
        let mut map = Map::new();
        map.insert("b".into(), json!(1));
        map.insert("10".into(), json!(2));
        map.insert("a".into(), json!(3));
        map.insert("2".into(), json!(4));
        map.insert("01".into(), json!(5));
        map.insert("4294967295".into(), json!(6)); // 2^32-1 is not an array index
        let b = WebhookBody::from_value("x", &Value::Object(map));
        assert_eq!(
            b.as_str(),
            r#"{"event":"x","data":{"2":4,"10":2,"b":1,"a":3,"01":5,"4294967295":6}}"#
        );
    }

    #[test]
    fn strings_escape_as_json_stringify_does() {
        let b = WebhookBody::new("e", &json!("a\"b\\c/d\n\u{1}\u{7f}é\u{2028}😀")).unwrap();
        assert_eq!(
            b.as_str(),
            "{\"event\":\"e\",\"data\":\"a\\\"b\\\\c/d\\n\\u0001\u{7f}é\u{2028}😀\"}"
        );
    }

    #[test]
    fn huge_integers_are_sent_unchanged() {
        let b = WebhookBody::new("e", &json!({"big": u64::MAX, "neg": i64::MIN})).unwrap();
        assert_eq!(
            b.as_str(),
            r#"{"event":"e","data":{"big":18446744073709551615,"neg":-9223372036854775808}}"#
        );
    }

    #[test]
    fn struct_fields_keep_declaration_order() {
        #[derive(Serialize)]
        struct P {
            zeta: i32,
            alpha: &'static str,
            price: f64,
        }
        let b = WebhookBody::new(
            "product:created",
            &P {
                zeta: 1,
                alpha: "x",
                price: 12.0,
            },
        )
        .unwrap();
        assert_eq!(
            b.as_str(),
            r#"{"event":"product:created","data":{"zeta":1,"alpha":"x","price":12}}"#
        );
    }

    #[test]
    fn a_map_with_non_string_keys_is_an_error_naming_the_event() {
        let mut m = std::collections::HashMap::new();
        m.insert(vec![1u8], 1);
        let err = WebhookBody::new("odd:event", &m).unwrap_err();
        assert!(err.to_string().contains("\"odd:event\""), "{err}");
    }

    #[test]
    fn array_index_follows_ecmascript() {
        assert_eq!(array_index("0"), Some(0));
        assert_eq!(array_index("4294967294"), Some(4294967294));
        assert_eq!(array_index("4294967295"), None);
        assert_eq!(array_index("007"), None);
        assert_eq!(array_index("-1"), None);
        assert_eq!(array_index("1.5"), None);
        assert_eq!(array_index(""), None);
    }
}
