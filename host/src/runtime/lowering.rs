//! How the host writes an event into a guest's memory (`switchyard:plugin/types.event`).
//!
//! [`EventView`] and a batch's [`BatchItemView`] borrow the host's own event, so no call
//! clones an event's strings before they are written into the guest. Their types and
//! layouts are those `bindgen!`'s derive gives the records ([`EventFields`],
//! [`BatchItemFields`]); only the writing is the host's own, for what the derived one
//! costs per event: it looks the guest's memory up again for every field it stores (three
//! times for a string: inside `realloc`, to copy, to store the pointer and length), and
//! those look-ups were the largest single cost of copying an event in. Here each string
//! is allocated and copied with one look-up, and the record's fixed part (a batch item's
//! delivery with it) is written with one more, after every allocation (an allocation may
//! grow the memory, which moves it).
//!
//! The items used here (`LowerContext`, `InterfaceType`, `CanonicalAbiInfo`) are
//! wasmtime's hidden ones, which its derive macros expand to: an upgrade of wasmtime must
//! keep `runtime_effects::a_plugin_receives_every_field_of_the_event` passing.
//!
//! Invariants: the bytes written are exactly the canonical ABI's for the record (the
//! field offsets come from the derived type's own layout); every allocation goes through
//! the guest's `realloc` as the ABI asks, one per string and list, in the order of the
//! fields; a guest whose strings are not UTF-8 is served by the derived code unchanged.

use wasmtime::component::__internal::wasmtime_environ::component::StringEncoding;
use wasmtime::component::__internal::{
    CanonicalAbiInfo, ComponentVariant, InstanceType, InterfaceType, LowerContext,
};
use wasmtime::component::{ComponentType, Lower};

use super::bindings::types;
use crate::event::Event;

/// The event's fields, with the record's type and layout as `bindgen!` would give them.
#[derive(ComponentType, Lower)]
#[component(record)]
pub(super) struct EventFields<'a> {
    id: &'a str,
    source: &'a str,
    #[component(name = "type")]
    ty: &'a str,
    subject: Option<&'a str>,
    time: Option<&'a str>,
    datacontenttype: Option<&'a str>,
    dataschema: Option<&'a str>,
    data: &'a [u8],
    extensions: Vec<(&'a str, &'a str)>,
}

/// The event as a guest receives it, lowered straight from the host's own event.
pub(super) struct EventView<'a>(EventFields<'a>);

impl<'a> EventView<'a> {
    pub(super) fn of(event: &'a Event) -> Self {
        Self(EventFields {
            id: &event.id,
            source: &event.source,
            ty: &event.ty,
            subject: event.subject.as_deref(),
            time: event.time.as_deref(),
            datacontenttype: event.datacontenttype.as_deref(),
            dataschema: event.dataschema.as_deref(),
            data: &event.data,
            extensions: event
                .extensions
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect(),
        })
    }
}

/// Makes `$view`, a view over the derived record `$fields`, a component type: its type,
/// layout, type-check and flat form are the record's; in memory, a guest whose strings are
/// UTF-8 gets `$store`, any other the derived code.
macro_rules! view_of_record {
    ($view:ident, $fields:ident, $store:ident) => {
        // SAFETY: every item is the derived record's own, so the type, its layout and its
        // type-check are exactly those of the record.
        #[allow(unsafe_code)]
        unsafe impl<'a> ComponentType for $view<'a> {
            type Lower = <$fields<'a> as ComponentType>::Lower;
            const ABI: CanonicalAbiInfo = <$fields<'a> as ComponentType>::ABI;

            fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
                $fields::typecheck(ty, types)
            }
        }

        // SAFETY: the flat form is the derived one; in memory, every byte `$store` writes
        // is inside the record (bounds-checked) or inside an allocation `realloc`
        // returned, which `LowerContext::realloc` has checked lies within the memory.
        #[allow(unsafe_code)]
        unsafe impl Lower for $view<'_> {
            fn linear_lower_to_flat<T>(
                &self,
                cx: &mut LowerContext<'_, T>,
                ty: InterfaceType,
                dst: &mut std::mem::MaybeUninit<Self::Lower>,
            ) -> wasmtime::Result<()> {
                self.0.linear_lower_to_flat(cx, ty, dst)
            }

            fn linear_lower_to_memory<T>(
                &self,
                cx: &mut LowerContext<'_, T>,
                ty: InterfaceType,
                offset: usize,
            ) -> wasmtime::Result<()> {
                if matches!(cx.options().string_encoding, StringEncoding::Utf8) {
                    $store(cx, &self.0, offset)
                } else {
                    self.0.linear_lower_to_memory(cx, ty, offset)
                }
            }
        }
    };
}

view_of_record!(EventView, EventFields, store_event_record);
view_of_record!(BatchItemView, BatchItemFields, store_batch_item);

/// One item of a batch (`switchyard:plugin/batch-handler.batch-item`), as `bindgen!`
/// would give it.
#[derive(ComponentType, Lower)]
#[component(record)]
pub(super) struct BatchItemFields<'a> {
    event: EventFields<'a>,
    delivery: types::Delivery,
}

/// One item of a batch, lowered as [`EventView`] is, its delivery written with the
/// event's record.
pub(super) struct BatchItemView<'a>(BatchItemFields<'a>);

impl<'a> BatchItemView<'a> {
    pub(super) fn of(event: &'a Event, delivery: types::Delivery) -> Self {
        Self(BatchItemFields {
            event: EventView::of(event).0,
            delivery,
        })
    }
}

fn store_event_record<T>(
    cx: &mut LowerContext<'_, T>,
    event: &EventFields<'_>,
    offset: usize,
) -> wasmtime::Result<()> {
    store_event(cx, event, offset, EventFields::SIZE32)?;
    Ok(())
}

fn store_batch_item<T>(
    cx: &mut LowerContext<'_, T>,
    item: &BatchItemFields<'_>,
    offset: usize,
) -> wasmtime::Result<()> {
    let record = store_event(cx, &item.event, offset, BatchItemFields::SIZE32)?;
    let mut field = 0;
    EventFields::ABI.next_field32_size(&mut field);
    let at = types::Delivery::ABI.next_field32_size(&mut field);
    let delivery = &item.delivery;
    let mut field = 0;
    let attempt = at + u32::ABI.next_field32_size(&mut field);
    let max_attempts = at + u32::ABI.next_field32_size(&mut field);
    let sequence = at + u64::ABI.next_field32_size(&mut field);
    record[attempt..attempt + 4].copy_from_slice(&delivery.attempt.to_le_bytes());
    record[max_attempts..max_attempts + 4].copy_from_slice(&delivery.max_attempts.to_le_bytes());
    record[sequence..sequence + 8].copy_from_slice(&delivery.sequence.to_le_bytes());
    Ok(())
}

/// Writes the event's strings and lists, then its record at the start of the
/// `record_size` bytes at `offset` (the event's record, or a larger one that begins with
/// it), which are returned for the rest of the record.
fn store_event<'c, T>(
    cx: &'c mut LowerContext<'_, T>,
    event: &EventFields<'_>,
    offset: usize,
    record_size: usize,
) -> wasmtime::Result<&'c mut [u8]> {
    let id = place(cx, event.id.as_bytes())?;
    let source = place(cx, event.source.as_bytes())?;
    let ty = place(cx, event.ty.as_bytes())?;
    let subject = place_optional(cx, event.subject)?;
    let time = place_optional(cx, event.time)?;
    let datacontenttype = place_optional(cx, event.datacontenttype)?;
    let dataschema = place_optional(cx, event.dataschema)?;
    let data = place(cx, event.data)?;
    let extensions = place_pairs(cx, &event.extensions)?;

    let record = guest_bytes(cx, offset, record_size)?;
    let string = <&str as ComponentType>::ABI;
    let optional = <Option<&str> as ComponentType>::ABI;
    let mut field = 0;
    for placed in [id, source, ty] {
        put_span(record, string.next_field32_size(&mut field), placed);
    }
    for placed in [subject, time, datacontenttype, dataschema] {
        let at = optional.next_field32_size(&mut field);
        record[at] = u8::from(placed.is_some());
        if let Some(placed) = placed {
            put_span(
                record,
                at + <Option<&str> as ComponentVariant>::PAYLOAD_OFFSET32,
                placed,
            );
        }
    }
    put_span(
        record,
        <&[u8] as ComponentType>::ABI.next_field32_size(&mut field),
        data,
    );
    put_span(
        record,
        <&[(&str, &str)] as ComponentType>::ABI.next_field32_size(&mut field),
        extensions,
    );
    Ok(record)
}

/// Where a string or list the host wrote into the guest lies: its offset and length.
#[derive(Clone, Copy)]
struct Span {
    offset: u32,
    len: u32,
}

/// The longest string the canonical ABI carries.
const MAX_STRING_BYTES: usize = (1 << 31) - 1;

/// Allocates `bytes` in the guest and copies them there: a string or a `list<u8>`
/// (both aligned to one byte).
fn place<T>(cx: &mut LowerContext<'_, T>, bytes: &[u8]) -> wasmtime::Result<Span> {
    if bytes.len() > MAX_STRING_BYTES {
        wasmtime::bail!(
            "a string or list of {} bytes is too long for a guest",
            bytes.len()
        );
    }
    let offset = cx.realloc(0, 0, 1, bytes.len())?;
    guest_bytes(cx, offset, bytes.len())?.copy_from_slice(bytes);
    Ok(Span {
        offset: u32::try_from(offset)?,
        len: u32::try_from(bytes.len())?,
    })
}

fn place_optional<T>(
    cx: &mut LowerContext<'_, T>,
    value: Option<&str>,
) -> wasmtime::Result<Option<Span>> {
    value.map(|value| place(cx, value.as_bytes())).transpose()
}

/// Allocates a `list<tuple<string, string>>` and its strings, in the ABI's order: the
/// list, then each element's strings.
fn place_pairs<T>(cx: &mut LowerContext<'_, T>, pairs: &[(&str, &str)]) -> wasmtime::Result<Span> {
    let element = <(&str, &str) as ComponentType>::SIZE32;
    let size = pairs
        .len()
        .checked_mul(element)
        .ok_or_else(|| wasmtime::format_err!("a list of {} pairs is too long", pairs.len()))?;
    let list = cx.realloc(0, 0, <(&str, &str) as ComponentType>::ALIGN32, size)?;
    let mut placed = Vec::with_capacity(pairs.len());
    for (name, value) in pairs {
        placed.push((place(cx, name.as_bytes())?, place(cx, value.as_bytes())?));
    }
    let elements = guest_bytes(cx, list, size)?;
    let string = <&str as ComponentType>::ABI;
    for (index, (name, value)) in placed.into_iter().enumerate() {
        let element = &mut elements[index * element..][..element];
        let mut field = 0;
        put_span(element, string.next_field32_size(&mut field), name);
        put_span(element, string.next_field32_size(&mut field), value);
    }
    Ok(Span {
        offset: u32::try_from(list)?,
        len: u32::try_from(pairs.len())?,
    })
}

/// The `len` bytes of the guest's memory at `offset`: one look-up of the memory.
fn guest_bytes<'c, T>(
    cx: &'c mut LowerContext<'_, T>,
    offset: usize,
    len: usize,
) -> wasmtime::Result<&'c mut [u8]> {
    cx.as_slice_mut()
        .get_mut(offset..)
        .and_then(|memory| memory.get_mut(..len))
        .ok_or_else(|| {
            wasmtime::format_err!("{len} bytes at {offset} lie beyond the guest's memory")
        })
}

/// Stores a span's offset and length, little-endian, at `at` within `record`, which the
/// caller has sized to hold the whole record.
fn put_span(record: &mut [u8], at: usize, span: Span) {
    record[at..at + 4].copy_from_slice(&span.offset.to_le_bytes());
    record[at + 4..at + 8].copy_from_slice(&span.len.to_le_bytes());
}
