//! Example plugin: the box office, a saga over event-sourced shows.
//!
//! Each show is an aggregate whose state lives in its subject stream `show/<show_id>`:
//! `show.opened` (the capacity), `seats.reserved`, `seats.released` and `show.cancelled`.
//! Every decision reads the stream and appends with the version it read
//! ([`Emit::expected_version`]), so two reservations racing for the last seats never both
//! get them: the host runs the loser again on the new state, and it is turned down.
//!
//! The saga of one reservation is event-sourced too, on its stream `reservation/<id>`
//! (`<id>` = `reservation_id`), so every step reads where the reservation stands and
//! appends its outcome with the version it read: a step runs at most once however often
//! its event is delivered, and no KV is needed.
//! - `reservation.requested` → `seats.reserved` on the show's stream, `reservation.held`
//!   and a `reservation.expired` scheduled `hold` later (config, default `10m`); or
//!   `reservation.rejected` when the seats are not there (sold out, unknown or cancelled
//!   show).
//! - `reservation.paid` while held → the expiry is cancelled, `reservation.confirmed`, and
//!   `payment.completed` goes to the ticketing flow (tickets, then the notification);
//!   after the hold ran out → `refund.requested`.
//! - `reservation.payment-failed` while held → the seats are released at once
//!   (`seats.released` on the show, `reservation.released`).
//! - `reservation.expired` while held → the seats are released.
//! - `show.cancelled` (appended to the show's stream by the producer) → every confirmed
//!   reservation of the show gets `refund.requested`, every held one is released.
//!
//! Every step's effects (stream appends, emits, the schedule or its cancellation) commit
//! together with the acknowledgement, so a host killed in the middle redoes the step at
//! most, never half of it.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard_sdk::{Delivery, Emit, Event, HandlerError, config, handler, stream};

/// How long seats are held for payment when the sidecar does not set `hold`.
const DEFAULT_HOLD: Duration = Duration::from_secs(600);
/// The most seats one reservation may ask for.
const MAX_SEATS: u32 = 100;

/// The stream subject of a show.
fn show_subject(show_id: &str) -> String {
    format!("show/{show_id}")
}

#[derive(Debug, Deserialize)]
struct ShowOpened {
    seats: u32,
}

#[derive(Debug, Deserialize)]
struct ReservationRequested {
    reservation_id: String,
    show_id: String,
    seats: u32,
    email: String,
}

/// `reservation.paid`, `reservation.payment-failed` and `reservation.expired`.
#[derive(Debug, Deserialize)]
struct ReservationRef {
    reservation_id: String,
    #[serde(default)]
    amount_cents: i64,
}

/// What `seats.reserved` and `seats.released` carry on a show's stream.
#[derive(Debug, Serialize, Deserialize)]
struct SeatChange {
    reservation_id: String,
    seats: u32,
}

/// Where one reservation stands, folded from its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Rejected,
    Held,
    Paid,
    Released,
    Refunded,
}

/// What `reservation.held` records.
#[derive(Debug, Serialize, Deserialize)]
struct Held {
    reservation_id: String,
    show_id: String,
    seats: u32,
    email: String,
    /// The id of the scheduled `reservation.expired`.
    expiry: String,
}

/// A reservation, folded from its stream; `None` before it was decided.
#[derive(Debug)]
struct Reservation {
    held: Option<Held>,
    stage: Stage,
    /// What the confirmed payment was, for a refund.
    paid_cents: i64,
    version: u64,
}

impl Reservation {
    fn load(id: &str) -> Result<Option<Self>, HandlerError> {
        let history = stream::read_all(&reservation_subject(id))?;
        let mut reservation: Option<Reservation> = None;
        let mut paid_cents = 0;
        for event in &history.events {
            let stage = match event.type_.as_str() {
                "reservation.rejected" => Stage::Rejected,
                "reservation.held" => Stage::Held,
                "reservation.confirmed" => Stage::Paid,
                "reservation.released" => Stage::Released,
                "refund.requested" => Stage::Refunded,
                _ => continue,
            };
            if stage == Stage::Paid {
                paid_cents = event.json::<ReservationRef>()?.amount_cents;
            }
            let held = if stage == Stage::Held {
                Some(event.json::<Held>()?)
            } else {
                reservation.take().and_then(|r| r.held)
            };
            reservation = Some(Reservation {
                held,
                stage,
                paid_cents,
                version: 0,
            });
        }
        Ok(reservation.map(|r| Reservation {
            version: history.version,
            ..r
        }))
    }
}

fn reservation_subject(id: &str) -> String {
    format!("reservation/{id}")
}

/// A show's state, folded from its stream.
#[derive(Debug, Default, PartialEq, Eq)]
struct Show {
    capacity: Option<u32>,
    taken: u32,
    cancelled: bool,
    /// Reservations with seats on the show, in stream order.
    reservations: Vec<String>,
}

impl Show {
    fn fold(events: &[Event]) -> Result<Self, HandlerError> {
        let mut show = Show::default();
        for event in events {
            match event.type_.as_str() {
                "show.opened" => show.capacity = Some(event.json::<ShowOpened>()?.seats),
                "seats.reserved" => {
                    let change: SeatChange = event.json()?;
                    show.taken += change.seats;
                    show.reservations.push(change.reservation_id);
                }
                "seats.released" => {
                    let change: SeatChange = event.json()?;
                    show.taken = show.taken.saturating_sub(change.seats);
                }
                "show.cancelled" => show.cancelled = true,
                _ => {}
            }
        }
        Ok(show)
    }

    fn available(&self) -> u32 {
        self.capacity.unwrap_or(0).saturating_sub(self.taken)
    }
}

fn hold() -> Result<Duration, HandlerError> {
    match config::get("hold") {
        None => Ok(DEFAULT_HOLD),
        Some(text) => parse_duration(&text).ok_or_else(|| {
            HandlerError::reject(format!(
                "config `hold` = `{text}` is not a duration such as 90s or 10m"
            ))
        }),
    }
}

/// `90s`, `10m`, `2h` or `500ms`.
fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    Some(match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        "h" => Duration::from_secs(number * 3600),
        _ => return None,
    })
}

#[handler(subscribe = [
    "reservation.requested",
    "reservation.paid",
    "reservation.payment-failed",
    "reservation.expired",
    "show.cancelled",
])]
fn handle(event: Event, _delivery: Delivery) -> Result<(), HandlerError> {
    match event.type_.as_str() {
        "reservation.requested" => request(event.json()?),
        "reservation.paid" => paid(event.json()?),
        "reservation.payment-failed" | "reservation.expired" => {
            let reference: ReservationRef = event.json()?;
            release(&reference.reservation_id, &event.type_)
        }
        "show.cancelled" => {
            let subject = event
                .subject
                .as_deref()
                .ok_or_else(|| HandlerError::reject("show.cancelled needs the show's subject"))?;
            cancel_show(subject)
        }
        other => Err(HandlerError::reject(format!(
            "unexpected event type {other}"
        ))),
    }
}

fn request(request: ReservationRequested) -> Result<(), HandlerError> {
    let id = request.reservation_id.as_str();
    if Reservation::load(id)?.is_some() {
        return Ok(()); // decided before: stay idempotent
    }
    if request.seats == 0 || request.seats > MAX_SEATS {
        return Err(HandlerError::reject(format!(
            "reservation {id}: {} seats is not between 1 and {MAX_SEATS}",
            request.seats
        )));
    }
    let subject = show_subject(&request.show_id);
    let history = stream::read_all(&subject)?;
    let show = Show::fold(&history.events)?;
    let refusal = if show.capacity.is_none() {
        Some("unknown show")
    } else if show.cancelled {
        Some("show cancelled")
    } else if show.available() < request.seats {
        Some("not enough seats")
    } else {
        None
    };
    if let Some(reason) = refusal {
        Emit::new("reservation.rejected")
            .subject(reservation_subject(id))
            .expected_version(0)
            .json(&serde_json::json!({
                "reservation_id": id,
                "show_id": request.show_id,
                "reason": reason,
            }))?
            .send();
        return Ok(());
    }
    Emit::new("seats.reserved")
        .subject(subject.as_str())
        .expected_version(history.version)
        .json(&SeatChange {
            reservation_id: id.to_owned(),
            seats: request.seats,
        })?
        .send();
    let expiry = Emit::new("reservation.expired")
        .subject(id)
        .delay(hold()?)
        .json(&serde_json::json!({"reservation_id": id}))?
        .send();
    Emit::new("reservation.held")
        .subject(reservation_subject(id))
        .expected_version(0)
        .json(&Held {
            reservation_id: id.to_owned(),
            show_id: request.show_id.clone(),
            seats: request.seats,
            email: request.email.clone(),
            expiry,
        })?
        .send();
    Ok(())
}

fn paid(payment: ReservationRef) -> Result<(), HandlerError> {
    let id = payment.reservation_id.as_str();
    let Some(reservation) = Reservation::load(id)? else {
        return Err(HandlerError::reject(format!(
            "payment for unknown reservation {id}"
        )));
    };
    match (reservation.stage, &reservation.held) {
        (Stage::Held, Some(held)) => {
            switchyard_sdk::cancel_scheduled(&held.expiry);
            Emit::new("reservation.confirmed")
                .subject(reservation_subject(id))
                .expected_version(reservation.version)
                .json(&serde_json::json!({"reservation_id": id, "amount_cents": payment.amount_cents}))?
                .send();
            Emit::new("payment.completed")
                .subject(id)
                .partition_key(id)
                .json(&serde_json::json!({
                    "order_id": id,
                    "amount_cents": payment.amount_cents,
                    "email": held.email,
                    "quantity": held.seats,
                }))?
                .send();
            Ok(())
        }
        // Paid after the hold ran out: the seats may be someone else's by now.
        (Stage::Released, _) => refund(
            id,
            reservation.version,
            payment.amount_cents,
            "the reservation expired before payment",
        ),
        (Stage::Rejected, _) => refund(
            id,
            reservation.version,
            payment.amount_cents,
            "the reservation was turned down",
        ),
        _ => Ok(()),
    }
}

fn refund(id: &str, version: u64, amount_cents: i64, reason: &str) -> Result<(), HandlerError> {
    Emit::new("refund.requested")
        .subject(reservation_subject(id))
        .expected_version(version)
        .json(&serde_json::json!({
            "reservation_id": id,
            "amount_cents": amount_cents,
            "reason": reason,
        }))?
        .send();
    Ok(())
}

/// Gives a held reservation's seats back to its show.
fn release(id: &str, why: &str) -> Result<(), HandlerError> {
    let Some(reservation) = Reservation::load(id)? else {
        return Ok(()); // nothing was held
    };
    let (Stage::Held, Some(held)) = (reservation.stage, &reservation.held) else {
        return Ok(());
    };
    if why != "reservation.expired" {
        switchyard_sdk::cancel_scheduled(&held.expiry);
    }
    // No expected version on the show: a release depends on the reservation's stage,
    // which the append below checks, not on what else happened to the show.
    Emit::new("seats.released")
        .subject(show_subject(&held.show_id))
        .json(&SeatChange {
            reservation_id: id.to_owned(),
            seats: held.seats,
        })?
        .send();
    Emit::new("reservation.released")
        .subject(reservation_subject(id))
        .expected_version(reservation.version)
        .json(&serde_json::json!({"reservation_id": id, "because": why}))?
        .send();
    Ok(())
}

fn cancel_show(subject: &str) -> Result<(), HandlerError> {
    let history = stream::read_all(subject)?;
    let show = Show::fold(&history.events)?;
    for id in &show.reservations {
        let Some(reservation) = Reservation::load(id)? else {
            continue;
        };
        match reservation.stage {
            Stage::Paid => refund(
                id,
                reservation.version,
                reservation.paid_cents,
                "the show was cancelled",
            )?,
            Stage::Held => release(id, "show.cancelled")?,
            Stage::Rejected | Stage::Released | Stage::Refunded => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ty: &str, data: serde_json::Value) -> Event {
        Event {
            id: "e".into(),
            source: "/t".into(),
            type_: ty.into(),
            subject: Some("show/s".into()),
            time: None,
            datacontenttype: None,
            dataschema: None,
            data: serde_json::to_vec(&data).unwrap(),
            extensions: Vec::new(),
        }
    }

    #[test]
    fn a_show_folds_from_its_stream() {
        let show = Show::fold(&[
            event("show.opened", serde_json::json!({"seats": 10})),
            event(
                "seats.reserved",
                serde_json::json!({"reservation_id": "a", "seats": 4}),
            ),
            event(
                "seats.reserved",
                serde_json::json!({"reservation_id": "b", "seats": 3}),
            ),
            event(
                "seats.released",
                serde_json::json!({"reservation_id": "a", "seats": 4}),
            ),
        ])
        .unwrap();
        assert_eq!(show.available(), 7);
        assert_eq!(show.reservations, vec!["a", "b"]);
        assert!(!show.cancelled);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("ten"), None);
    }
}
