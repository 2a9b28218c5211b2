//! What the attribute means, checked against the struct: the spec `expand` generates from.

use proc_macro2::Span;
use syn::parse_quote;

use crate::ast::{Field, Model};
use crate::attr::Attrs;
use crate::case::{closest, lower_camel, upper_camel};

pub(crate) struct Spec<'a> {
    pub(crate) model: &'a Model<'a>,
    pub(crate) krate: syn::Path,
    /// The event prefix: `product`.
    pub(crate) event: String,
    pub(crate) created: bool,
    pub(crate) updated: bool,
    pub(crate) deleted: bool,
    pub(crate) hooks: bool,
    /// Latest-wins coalescing of full-state events.
    pub(crate) latest_wins: bool,
    pub(crate) primary_key: Vec<&'a Field<'a>>,
    /// `productId`: the key of the primary key in watch payloads.
    pub(crate) id_key: String,
    pub(crate) watch: Vec<WatchSpec<'a>>,
    /// `room = "…"` templates, in order.
    pub(crate) rooms: Vec<Vec<Piece<'a>>>,
    /// `rooms_with = "…"`.
    pub(crate) rooms_with: Option<syn::Path>,
}

impl Spec<'_> {
    /// Whether the entity's events carry rooms (it has `room` or `rooms_with`).
    pub(crate) fn targeted(&self) -> bool {
        !self.rooms.is_empty() || self.rooms_with.is_some()
    }

    /// The fields the room templates read, each once, in order.
    pub(crate) fn room_fields(&self) -> Vec<&Field<'_>> {
        let mut out: Vec<&Field<'_>> = Vec::new();
        for piece in self.rooms.iter().flatten() {
            if let Piece::Field(f) = piece
                && !out.iter().any(|o| o.ident == f.ident)
            {
                out.push(f);
            }
        }
        out
    }
}

/// A part of a room template: text as written, or a field's value.
pub(crate) enum Piece<'a> {
    Text(String),
    Field(&'a Field<'a>),
}

pub(crate) struct WatchSpec<'a> {
    pub(crate) field: &'a Field<'a>,
    /// `stock:updated`
    pub(crate) event: String,
    /// `newStock`
    pub(crate) value_key: String,
}

pub(crate) fn check<'a>(
    model: &'a Model<'a>,
    attrs: Attrs,
    errors: &mut Vec<syn::Error>,
) -> Option<Spec<'a>> {
    let at = attrs.span.unwrap_or_else(|| model.ident.span());
    let event = match &attrs.event {
        Some(lit) => {
            let v = lit.value();
            if v.is_empty() || v.contains(':') || v.chars().any(char::is_whitespace) {
                errors.push(syn::Error::new(
                    lit.span(),
                    "`event` is the prefix of the event names, without `:` or spaces: \
                     event = \"product\" gives product:created, product:updated, product:deleted",
                ));
            }
            v
        }
        None if attrs.event_given => String::new(), // its value was already reported
        None => {
            errors.push(syn::Error::new(
                at,
                "missing `event`: add #[observe(event = \"product\")] to name the events \
                 (product:created, product:updated, product:deleted)",
            ));
            String::new()
        }
    };
    let primary_key = model.primary_key();
    if primary_key.is_empty() {
        errors.push(syn::Error::new(
            model.ident.span(),
            "no field has #[sea_orm(primary_key)]: the events name their row by its primary key",
        ));
    }
    let (created, updated, deleted) = match &attrs.on {
        None => (true, true, true),
        Some(list) => {
            let has = |n: &str| list.iter().any(|i| i == n);
            (has("created"), has("updated"), has("deleted"))
        }
    };
    let mut watch: Vec<WatchSpec<'a>> = Vec::new();
    for w in &attrs.watch {
        let Some(field) = model.field(&w.field) else {
            let hint = closest(
                &w.field,
                model
                    .fields
                    .iter()
                    .map(|f| f.ident.to_string())
                    .collect::<Vec<_>>()
                    .iter()
                    .map(String::as_str),
            )
            .map(|c| format!("; did you mean `{c}`?"))
            .unwrap_or_default();
            errors.push(syn::Error::new(
                w.span,
                format!(
                    "`watch` names no field of `{}`: there is no `{}`{hint}",
                    model.ident, w.field
                ),
            ));
            continue;
        };
        if watch.iter().any(|x| x.field.ident == field.ident) {
            errors.push(syn::Error::new(
                w.span,
                format!("`{}` is watched twice", w.field),
            ));
            continue;
        }
        let event_name = match &w.event {
            Some(lit) => {
                let v = lit.value();
                if v.trim().is_empty() {
                    errors.push(syn::Error::new(
                        lit.span(),
                        "a watch event name cannot be empty",
                    ));
                }
                v
            }
            None => format!("{}:updated", w.field),
        };
        watch.push(WatchSpec {
            field,
            event: event_name,
            value_key: format!("new{}", upper_camel(&w.field)),
        });
    }
    let rooms = attrs
        .rooms
        .iter()
        .filter_map(|lit| room_template(model, lit, errors))
        .collect();
    if watch.len() > 64 {
        errors.push(syn::Error::new(
            Span::call_site(),
            "at most 64 fields can be watched",
        ));
    }
    if !errors.is_empty() {
        return None;
    }
    Some(Spec {
        model,
        krate: attrs
            .krate
            .unwrap_or_else(|| parse_quote!(::vendora_observe)),
        id_key: format!("{}Id", lower_camel(&event)),
        event,
        created,
        updated,
        deleted,
        hooks: attrs.hooks.is_some(),
        latest_wins: attrs.latest_wins.is_some(),
        primary_key,
        watch,
        rooms,
        rooms_with: attrs.rooms_with.map(|(path, _)| path),
    })
}

/// `"store:{store_id}"`: text, and fields between braces (`{{` and `}}` for braces).
/// Errors point at the template.
fn room_template<'a>(
    model: &'a Model<'a>,
    lit: &syn::LitStr,
    errors: &mut Vec<syn::Error>,
) -> Option<Vec<Piece<'a>>> {
    let template = lit.value();
    let example = "room = \"store:{store_id}\"";
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = template.chars().peekable();
    let mut ok = true;
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut name = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    name.push(c);
                }
                let name = name.trim();
                if !closed {
                    errors.push(syn::Error::new(
                        lit.span(),
                        format!("`room`: a `{{` without its `}}` in {template:?}: write {example}, and `{{{{` for a brace"),
                    ));
                    ok = false;
                    break;
                }
                if name.is_empty() {
                    errors.push(syn::Error::new(
                        lit.span(),
                        format!("`room`: `{{}}` names no field: write {example}"),
                    ));
                    ok = false;
                    continue;
                }
                match model.field(name) {
                    Some(field) => {
                        if !text.is_empty() {
                            pieces.push(Piece::Text(std::mem::take(&mut text)));
                        }
                        pieces.push(Piece::Field(field));
                    }
                    None => {
                        let names: Vec<String> =
                            model.fields.iter().map(|f| f.ident.to_string()).collect();
                        let hint = closest(name, names.iter().map(String::as_str))
                            .map(|c| format!("; did you mean `{c}`?"))
                            .unwrap_or_default();
                        errors.push(syn::Error::new(
                            lit.span(),
                            format!(
                                "`room` names no field of `{}`: there is no `{name}`{hint}",
                                model.ident
                            ),
                        ));
                        ok = false;
                    }
                }
            }
            '}' => {
                errors.push(syn::Error::new(
                    lit.span(),
                    format!(
                        "`room`: a `}}` without its `{{` in {template:?}: write `}}}}` for a brace"
                    ),
                ));
                ok = false;
            }
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    if ok && pieces.is_empty() {
        errors.push(syn::Error::new(
            lit.span(),
            format!("`room` cannot be empty: write {example}"),
        ));
        ok = false;
    }
    ok.then_some(pieces)
}
