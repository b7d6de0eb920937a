//! The `#[handler]` attribute of `switchyard-sdk`.
//!
//! Use it through `switchyard_sdk::handler`; this crate is an implementation detail and its
//! expansion refers to `::switchyard_sdk`.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Expr, ExprArray, ExprLit, FnArg, ItemFn, Lit, LitStr, ReturnType, parse_macro_input};

/// What the fix for a wrong signature is; used in every signature error.
const SIGNATURE: &str = "a switchyard handler takes `(event: Event, delivery: Delivery)` \
                         and returns `Result<(), HandlerError>`";

/// Marks the function that handles events and turns the crate into a Switchyard plugin.
///
/// See `switchyard_sdk::handler` for the documentation.
#[proc_macro_attribute]
pub fn handler(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut config = Config::default();
    let parser = syn::meta::parser(|meta| config.parse(meta));
    parse_macro_input!(args with parser);
    let function = parse_macro_input!(item as ItemFn);
    match expand(config, function.clone()) {
        Ok(tokens) => tokens.into(),
        // Keep the function, so the error is the only one the user sees.
        Err(error) => {
            let error = error.into_compile_error();
            quote!(#function #error).into()
        }
    }
}

#[derive(Default)]
struct Config {
    subscribe: Option<(Span, Vec<LitStr>)>,
    name: Option<LitStr>,
    version: Option<LitStr>,
}

impl Config {
    fn parse(&mut self, meta: syn::meta::ParseNestedMeta<'_>) -> syn::Result<()> {
        if meta.path.is_ident("subscribe") {
            if self.subscribe.is_some() {
                return Err(meta.error("`subscribe` is given twice"));
            }
            let array: ExprArray = meta.value()?.parse().map_err(|e| {
                syn::Error::new(
                    e.span(),
                    "expected a list of event-type patterns: `subscribe = [\"payment.completed\"]`",
                )
            })?;
            let mut patterns = Vec::new();
            for elem in &array.elems {
                match elem {
                    Expr::Lit(ExprLit {
                        lit: Lit::Str(s), ..
                    }) => {
                        if let Err(why) = check_pattern(&s.value()) {
                            return Err(syn::Error::new_spanned(
                                s,
                                format!("invalid subscription pattern: {why}"),
                            ));
                        }
                        patterns.push(s.clone());
                    }
                    other => {
                        return Err(syn::Error::new_spanned(
                            other,
                            "a subscription is a string literal such as \"payment.completed\", \
                             \"order.*\" or \"audit.>\"",
                        ));
                    }
                }
            }
            if patterns.is_empty() {
                return Err(syn::Error::new_spanned(
                    &array,
                    "subscribe to at least one event-type pattern, such as `[\">\"]` for every event",
                ));
            }
            self.subscribe = Some((array.span(), patterns));
            Ok(())
        } else if meta.path.is_ident("name") {
            if self.name.is_some() {
                return Err(meta.error("`name` is given twice"));
            }
            let name: LitStr = meta.value()?.parse()?;
            if name.value().trim().is_empty() {
                return Err(syn::Error::new_spanned(&name, "the name must not be empty"));
            }
            self.name = Some(name);
            Ok(())
        } else if meta.path.is_ident("version") {
            if self.version.is_some() {
                return Err(meta.error("`version` is given twice"));
            }
            self.version = Some(meta.value()?.parse()?);
            Ok(())
        } else {
            Err(meta.error(
                "unknown argument; expected `subscribe = [..]`, `name = \"..\"` or `version = \"..\"`",
            ))
        }
    }
}

/// Checks an event-type pattern: dot-separated segments of `[A-Za-z0-9_-]`, `*` for exactly
/// one segment, `>` for one or more trailing segments, at most 255 bytes.
fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("the pattern is empty".into());
    }
    if pattern.len() > 255 {
        return Err("the pattern is longer than 255 bytes".into());
    }
    let segments: Vec<&str> = pattern.split('.').collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *segment {
            "" => return Err(format!("{pattern:?} has an empty segment")),
            "*" => {}
            ">" if last => {}
            ">" => return Err(format!("in {pattern:?}, `>` may only be the last segment")),
            s if s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') => {}
            s => {
                return Err(format!(
                    "segment {s:?} of {pattern:?} may only contain A-Z, a-z, 0-9, `_` and `-`, \
                     or be exactly `*` or `>`"
                ));
            }
        }
    }
    Ok(())
}

fn expand(config: Config, mut function: ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    let Some((_, patterns)) = config.subscribe else {
        return Err(syn::Error::new(
            Span::call_site(),
            "missing `subscribe`: write `#[handler(subscribe = [\"payment.completed\"])]`",
        ));
    };
    check_signature(&function)?;
    // The contract fixes the signature, so taking the event by value is not a choice.
    function
        .attrs
        .push(syn::parse_quote!(#[allow(clippy::needless_pass_by_value)]));

    let sig = &function.sig;
    let ident = &sig.ident;
    let name = match &config.name {
        Some(name) => quote!(#name),
        None => quote!(::core::env!("CARGO_PKG_NAME")),
    };
    let version = match &config.version {
        Some(version) => quote!(#version),
        None => quote!(::core::env!("CARGO_PKG_VERSION")),
    };

    // Calling the function through a `fn` pointer of the exact type gives a type error that
    // points at the user's signature instead of at generated code.
    let checked = quote_spanned! {sig.span()=>
        let handler: fn(
            ::switchyard_sdk::Event,
            ::switchyard_sdk::Delivery,
        ) -> ::core::result::Result<(), ::switchyard_sdk::HandlerError> = #ident;
    };

    Ok(quote! {
        #function

        #[doc(hidden)]
        #[allow(non_camel_case_types, dead_code, missing_docs)]
        const _: () = {
            struct __SwitchyardHandler;

            impl ::switchyard_sdk::__private::Guest for __SwitchyardHandler {
                fn describe() -> ::switchyard_sdk::PluginInfo {
                    ::switchyard_sdk::PluginInfo {
                        name: ::std::string::String::from(#name),
                        version: ::std::string::String::from(#version),
                        subscriptions: ::std::vec![
                            #(::std::string::String::from(#patterns)),*
                        ],
                    }
                }

                fn handle(
                    event: ::switchyard_sdk::Event,
                    delivery: ::switchyard_sdk::Delivery,
                ) -> ::core::result::Result<(), ::switchyard_sdk::HandlerError> {
                    #checked
                    handler(event, delivery)
                }
            }

            impl ::switchyard_sdk::__private::BatchGuest for __SwitchyardHandler {
                fn handle_batch(
                    items: ::std::vec::Vec<::switchyard_sdk::__private::BatchItem>,
                ) {
                    #checked
                    ::switchyard_sdk::__private::run_batch(items, handler)
                }
            }

            ::switchyard_sdk::__private::bindings::export!(
                __SwitchyardHandler with_types_in ::switchyard_sdk::__private::bindings
            );
        };
    })
}

fn check_signature(function: &ItemFn) -> syn::Result<()> {
    let sig = &function.sig;
    let fail = |tokens: &dyn quote::ToTokens, what: &str| {
        Err(syn::Error::new_spanned(
            tokens,
            format!("{what}: {SIGNATURE}"),
        ))
    };
    if let Some(asyncness) = &sig.asyncness {
        return fail(asyncness, "a switchyard handler cannot be `async`");
    }
    if let Some(unsafety) = &sig.unsafety {
        return fail(unsafety, "a switchyard handler cannot be `unsafe`");
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return fail(&sig.generics, "a switchyard handler cannot be generic");
    }
    if let Some(variadic) = &sig.variadic {
        return fail(variadic, "a switchyard handler cannot be variadic");
    }
    if let Some(FnArg::Receiver(receiver)) = sig.inputs.first() {
        return fail(
            receiver,
            "a switchyard handler is a free function, not a method",
        );
    }
    if sig.inputs.len() != 2 {
        let what = format!(
            "this handler takes {} argument{}",
            sig.inputs.len(),
            if sig.inputs.len() == 1 { "" } else { "s" }
        );
        return if sig.inputs.is_empty() {
            fail(sig, &what)
        } else {
            fail(&sig.inputs, &what)
        };
    }
    if let ReturnType::Default = sig.output {
        return fail(sig, "this handler returns nothing");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        for ok in [
            ">",
            "a",
            "a.b",
            "a.*",
            "a.>",
            "*.b",
            "payment.completed",
            "x_y-z.*.>",
        ] {
            assert_eq!(check_pattern(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "a..b",
            ".a",
            "a.",
            "a.>.b",
            ">.a",
            "a.b c",
            "a.*x",
            "ä",
            &"a".repeat(256),
        ] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
    }

    fn expand_str(args: &str, item: &str) -> Result<String, String> {
        let mut config = Config::default();
        let parser = syn::meta::parser(|meta| config.parse(meta));
        syn::parse::Parser::parse_str(parser, args).map_err(|e| e.to_string())?;
        let function: ItemFn = syn::parse_str(item).map_err(|e| e.to_string())?;
        expand(config, function)
            .map(|t| t.to_string())
            .map_err(|e| e.to_string())
    }

    const GOOD: &str =
        "fn handle(event: Event, delivery: Delivery) -> Result<(), HandlerError> { Ok(()) }";

    #[test]
    fn expands_a_good_handler() {
        let out = expand_str(r#"subscribe = ["a.b", "c.>"], name = "n""#, GOOD).unwrap();
        assert!(out.contains("\"a.b\""), "{out}");
        assert!(out.contains("\"n\""), "{out}");
        assert!(out.contains("CARGO_PKG_VERSION"), "{out}");
        assert!(out.contains("export !"), "{out}");
    }

    #[test]
    fn rejects_bad_arguments() {
        assert!(
            expand_str("", GOOD)
                .unwrap_err()
                .contains("missing `subscribe`")
        );
        assert!(
            expand_str("subscribe = []", GOOD)
                .unwrap_err()
                .contains("at least one")
        );
        assert!(
            expand_str(r#"subscribe = ["a..b"]"#, GOOD)
                .unwrap_err()
                .contains("empty segment")
        );
        assert!(
            expand_str(r#"subscribe = [1]"#, GOOD)
                .unwrap_err()
                .contains("string literal")
        );
        assert!(
            expand_str(r#"subscribe = ["a"], colour = "red""#, GOOD)
                .unwrap_err()
                .contains("unknown argument")
        );
    }

    #[test]
    fn rejects_bad_signatures() {
        for item in [
            "fn handle(event: Event) -> Result<(), HandlerError> { Ok(()) }",
            "fn handle() -> Result<(), HandlerError> { Ok(()) }",
            "fn handle(a: Event, b: Delivery, c: u8) -> Result<(), HandlerError> { Ok(()) }",
            "fn handle(event: Event, delivery: Delivery) {}",
            "async fn handle(event: Event, delivery: Delivery) -> Result<(), HandlerError> { Ok(()) }",
            "fn handle<T>(event: Event, delivery: T) -> Result<(), HandlerError> { Ok(()) }",
        ] {
            let err = expand_str(r#"subscribe = [">"]"#, item).unwrap_err();
            assert!(err.contains(SIGNATURE), "{item}: {err}");
        }
    }
}
