//! `#[observe(...)]`, read into one `Option` per key. Meaning is checked in `valid`.

use proc_macro2::Span;
use syn::meta::ParseNestedMeta;
use syn::parse::{Parse, ParseStream};
use syn::spanned::Spanned;
use syn::{Attribute, Expr, ExprLit, Ident, Lit, LitStr, Token};

use crate::case::closest;

pub(crate) const KEYS: [&str; 8] = [
    "event",
    "on",
    "watch",
    "room",
    "rooms_with",
    "hooks",
    "latest_wins",
    "crate",
];
pub(crate) const HOOKS: [&str; 3] = ["created", "updated", "deleted"];

#[derive(Default)]
pub(crate) struct Attrs {
    /// The first `#[observe]`'s span, for errors about what is missing.
    pub(crate) span: Option<Span>,
    /// Whether an `event` key was written (even with a bad value).
    pub(crate) event_given: bool,
    pub(crate) event: Option<LitStr>,
    pub(crate) on: Option<Vec<Ident>>,
    pub(crate) watch: Vec<Watch>,
    /// `room = "store:{store_id}"`, each given.
    pub(crate) rooms: Vec<LitStr>,
    /// `rooms_with = "path::to::fn"`.
    pub(crate) rooms_with: Option<(syn::Path, Span)>,
    pub(crate) hooks: Option<Span>,
    pub(crate) latest_wins: Option<Span>,
    pub(crate) krate: Option<syn::Path>,
}

/// One watched field: `"stock"`, `stock`, or `stock = "inventory:changed"`.
pub(crate) struct Watch {
    pub(crate) field: String,
    pub(crate) span: Span,
    pub(crate) event: Option<LitStr>,
}

impl Parse for Watch {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        if input.peek(LitStr) {
            let lit: LitStr = input.parse()?;
            return Ok(Watch {
                field: lit.value(),
                span: lit.span(),
                event: None,
            });
        }
        let lookahead = input.lookahead1();
        if !lookahead.peek(Ident) {
            return Err(lookahead.error());
        }
        let ident: Ident = input.parse()?;
        let event = if input.peek(Token![=]) {
            input.parse::<Token![=]>()?;
            Some(input.parse::<LitStr>()?)
        } else {
            None
        };
        Ok(Watch {
            field: ident.to_string(),
            span: ident.span(),
            event,
        })
    }
}

/// Reads every `#[observe(...)]` on the struct, pushing each error into `errors`.
pub(crate) fn parse(attrs: &[Attribute], errors: &mut Vec<syn::Error>) -> Attrs {
    let mut out = Attrs::default();
    for attr in attrs.iter().filter(|a| a.path().is_ident("observe")) {
        out.span.get_or_insert(attr.path().span());
        if let Err(e) = attr.parse_nested_meta(|meta| parse_key(&mut out, meta, errors)) {
            errors.push(e);
        }
    }
    out
}

fn parse_key(
    out: &mut Attrs,
    meta: ParseNestedMeta,
    errors: &mut Vec<syn::Error>,
) -> syn::Result<()> {
    let path = &meta.path;
    let name = path
        .get_ident()
        .map(Ident::to_string)
        .unwrap_or_else(|| quote::ToTokens::to_token_stream(path).to_string());
    let duplicate = |errors: &mut Vec<syn::Error>| {
        errors.push(syn::Error::new(
            path.span(),
            format!("duplicate `{name}` in #[observe(...)]: give it once"),
        ));
    };
    match name.as_str() {
        "event" => {
            out.event_given = true;
            let lit = string_value(&meta, "event = \"product\"", errors)?;
            if out.event.is_some() {
                duplicate(errors);
            } else {
                out.event = lit;
            }
        }
        "room" => {
            if let Some(lit) = string_value(&meta, "room = \"store:{store_id}\"", errors)? {
                out.rooms.push(lit);
            }
        }
        "rooms_with" => {
            let lit = string_value(&meta, "rooms_with = \"crate::rooms_of_order\"", errors)?;
            if out.rooms_with.is_some() {
                duplicate(errors);
            } else if let Some(lit) = lit {
                match lit.parse::<syn::Path>() {
                    Ok(p) => out.rooms_with = Some((p, lit.span())),
                    Err(_) => errors.push(syn::Error::new(
                        lit.span(),
                        "`rooms_with` names a function `fn(&Model) -> Vec<String>`, like \
                         rooms_with = \"crate::rooms_of_order\"",
                    )),
                }
            }
        }
        "crate" => {
            let lit = string_value(&meta, "crate = \"vendora_observe\"", errors)?;
            if out.krate.is_some() {
                duplicate(errors);
            } else if let Some(lit) = lit {
                match lit.parse::<syn::Path>() {
                    Ok(p) => out.krate = Some(p),
                    Err(_) => errors.push(syn::Error::new(
                        lit.span(),
                        "`crate` must name a path, like crate = \"vendora_observe\"",
                    )),
                }
            }
        }
        "hooks" => flag(
            &meta,
            &mut out.hooks,
            "`hooks` takes no value: write #[observe(..., hooks)] and implement \
             `vendora_observe::ActiveModelHooks` for `ActiveModel`",
            errors,
        )?,
        "latest_wins" => flag(
            &meta,
            &mut out.latest_wins,
            "`latest_wins` takes no value: write #[observe(..., latest_wins)]",
            errors,
        )?,
        "on" => {
            if !meta.input.peek(syn::token::Paren) {
                skip_value(&meta)?;
                errors.push(syn::Error::new(
                    path.span(),
                    "`on` takes a list: on(created, updated, deleted)",
                ));
                return Ok(());
            }
            let mut hooks = Vec::new();
            meta.parse_nested_meta(|inner| {
                match inner.path.get_ident() {
                    Some(ident) if HOOKS.iter().any(|h| ident == h) => {
                        if hooks.iter().any(|h: &Ident| h == ident) {
                            errors.push(syn::Error::new(
                                ident.span(),
                                format!("`{ident}` is listed twice in on(...)"),
                            ));
                        } else {
                            hooks.push(ident.clone());
                        }
                    }
                    _ => {
                        let shown = quote::ToTokens::to_token_stream(&inner.path).to_string();
                        let hint = closest(&shown, HOOKS)
                            .map(|c| format!("; did you mean `{c}`?"))
                            .unwrap_or_default();
                        errors.push(syn::Error::new(
                            inner.path.span(),
                            format!(
                                "unknown event `{shown}` in on(...): expected `created`, \
                                 `updated` or `deleted`{hint}"
                            ),
                        ));
                    }
                }
                Ok(())
            })?;
            if out.on.is_some() {
                duplicate(errors);
            } else {
                out.on = Some(hooks);
            }
        }
        "watch" => {
            if meta.input.peek(Token![=]) {
                if let Some(lit) = string_value(&meta, "watch = \"stock\"", errors)? {
                    out.watch.push(Watch {
                        field: lit.value(),
                        span: lit.span(),
                        event: None,
                    });
                }
            } else if meta.input.peek(syn::token::Paren) {
                let content;
                syn::parenthesized!(content in meta.input);
                let items = content.parse_terminated(Watch::parse, Token![,])?;
                out.watch.extend(items);
            } else {
                errors.push(syn::Error::new(
                    path.span(),
                    "`watch` names fields: watch = \"stock\", or watch(stock, price = \"price:changed\")",
                ));
            }
        }
        _ => {
            skip_value(&meta)?;
            let suggestion = closest(&name, KEYS);
            // A misspelt `event` is that key given wrongly, not missing: one message.
            out.event_given |= suggestion == Some("event");
            let hint = suggestion
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_default();
            errors.push(syn::Error::new(
                path.span(),
                format!(
                    "unknown `observe` attribute `{name}`: expected one of `event`, `on`, \
                     `watch`, `room`, `rooms_with`, `hooks`, `latest_wins`, `crate`{hint}"
                ),
            ));
        }
    }
    Ok(())
}

/// A key that takes no value (`hooks`, `latest_wins`): set once, or reported.
fn flag(
    meta: &ParseNestedMeta,
    slot: &mut Option<Span>,
    takes_no_value: &str,
    errors: &mut Vec<syn::Error>,
) -> syn::Result<()> {
    let path = &meta.path;
    if !meta.input.is_empty() && !meta.input.peek(Token![,]) {
        skip_value(meta)?;
        errors.push(syn::Error::new(path.span(), takes_no_value));
    } else if slot.is_some() {
        let name = quote::ToTokens::to_token_stream(path).to_string();
        errors.push(syn::Error::new(
            path.span(),
            format!("duplicate `{name}` in #[observe(...)]: give it once"),
        ));
    } else {
        *slot = Some(path.span());
    }
    Ok(())
}

/// `key = "string"`. A value of another kind is reported at the value, with an example.
fn string_value(
    meta: &ParseNestedMeta,
    example: &str,
    errors: &mut Vec<syn::Error>,
) -> syn::Result<Option<LitStr>> {
    let key = meta
        .path
        .get_ident()
        .map(Ident::to_string)
        .unwrap_or_default();
    if !meta.input.peek(Token![=]) {
        skip_value(meta)?;
        errors.push(syn::Error::new(
            meta.path.span(),
            format!("`{key}` needs a value: {example}"),
        ));
        return Ok(None);
    }
    let expr: Expr = meta.value()?.parse()?;
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => Ok(Some(s)),
        other => {
            errors.push(syn::Error::new(
                other.span(),
                format!("`{key}` takes a string literal: {example}"),
            ));
            Ok(None)
        }
    }
}

/// Consumes whatever follows a key (`= expr` or `(...)`), so parsing can go on to the
/// next key after an error.
fn skip_value(meta: &ParseNestedMeta) -> syn::Result<()> {
    if meta.input.peek(Token![=]) {
        let _: Expr = meta.value()?.parse()?;
    } else if meta.input.peek(syn::token::Paren) {
        let _content;
        syn::parenthesized!(_content in meta.input);
        let _: proc_macro2::TokenStream = _content.parse()?;
    }
    Ok(())
}
