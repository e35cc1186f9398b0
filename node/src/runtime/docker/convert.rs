//! Translations from the Docker engine's vocabulary to the port's: errors, container states and
//! timestamps. Pure functions, so every mapping is unit-tested without an engine.

use bollard::errors::Error as EngineError;
use bollard::models::{ContainerState as EngineState, ContainerStateStatusEnum as Status};

use crate::runtime::{ContainerState, JobRef, RuntimeError};

/// The HTTP status of an engine answer, when the error is one.
pub(super) fn status_of(err: &EngineError) -> Option<u16> {
    match err {
        EngineError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Whether a start failed because an earlier start of the same container was cut short: dockerd
/// stopped or was killed while starting it, containerd kept what it had made (maybe a running
/// process), and this dockerd could not clear it. Every later start of that container answers
/// the same (`500 … id already in use`); only a new container gets past it.
pub(super) fn start_cut_short(err: &EngineError) -> bool {
    // Not a host port taken by another process ("bind: address already in use").
    matches!(err, EngineError::DockerResponseServerError { status_code, message }
        if *status_code >= 500 && message.contains("id already in use") && !message.contains("address already in use"))
}

/// Maps an engine error met while doing `what` ("create container outpost-x-1") to the port's
/// error: unreachable engine and 5xx are retryable, a refused request is not. Callers handle the
/// statuses that mean something for their operation (404, 409) before calling this.
pub(super) fn engine_error(what: &str, err: EngineError) -> RuntimeError {
    match err {
        EngineError::DockerResponseServerError { status_code, message } if status_code >= 500 => {
            RuntimeError::Unavailable(format!(
                "{what}: the Docker engine answered {status_code}: {message}; retry later"
            ))
        }
        EngineError::DockerResponseServerError { status_code, message } => RuntimeError::Invalid(format!(
            "{what}: the Docker engine refused the request ({status_code}): {message}"
        )),
        EngineError::HyperLegacyError { .. }
        | EngineError::HyperResponseError { .. }
        | EngineError::IOError { .. }
        | EngineError::RequestTimeoutError
        | EngineError::SocketNotFoundError(_) => RuntimeError::Unavailable(format!(
            "{what}: cannot reach the Docker engine ({err}); is dockerd running and its socket readable?"
        )),
        EngineError::URLEncodedError { .. }
        | EngineError::URLParseError { .. }
        | EngineError::InvalidURIError { .. }
        | EngineError::InvalidURIPartsError { .. }
        | EngineError::HttpClientError { .. } => {
            RuntimeError::Invalid(format!("{what}: could not build the request to the engine: {err}"))
        }
        other => RuntimeError::Unavailable(format!("{what}: {other}")),
    }
}

/// How a job is named in NotFound errors.
pub(super) fn job_label(job: &JobRef) -> String {
    format!("{} (attempt {})", job.job_id, job.attempt)
}

/// The port's view of an engine container state.
pub(super) fn container_state(state: Option<&EngineState>) -> ContainerState {
    let Some(state) = state else {
        return ContainerState::Created;
    };
    let started = state.started_at.as_deref().and_then(parse_docker_time);
    let exited = || {
        let finished = state.finished_at.as_deref().and_then(parse_docker_time);
        // For a process that exits at once the engine can record StartedAt a few milliseconds
        // after FinishedAt; a job never ends before it starts.
        let started = match (started, finished) {
            (Some(s), Some(f)) => Some(s.min(f)),
            (s, _) => s,
        };
        ContainerState::Exited {
            exit_code: state.exit_code.unwrap_or(-1),
            started_unix_ms: started,
            finished_unix_ms: finished,
            oom_killed: state.oom_killed.unwrap_or(false),
        }
    };
    match state.status {
        Some(Status::CREATED) => ContainerState::Created,
        Some(Status::RUNNING | Status::PAUSED | Status::RESTARTING | Status::STOPPING) => {
            ContainerState::Running { started_unix_ms: started.unwrap_or(0) }
        }
        Some(Status::EXITED | Status::DEAD | Status::REMOVING) => exited(),
        Some(Status::EMPTY) | None => {
            if state.running.unwrap_or(false) {
                ContainerState::Running { started_unix_ms: started.unwrap_or(0) }
            } else if started.is_some() {
                exited()
            } else {
                ContainerState::Created
            }
        }
    }
}

/// Parses an RFC 3339 timestamp as Docker writes them ("2024-05-01T10:20:30.123456789Z") into
/// unix milliseconds. Docker's zero time ("0001-01-01T00:00:00Z", never happened) and anything
/// before the epoch or malformed are `None`.
pub(super) fn parse_docker_time(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let digits = b.get(from..from + len)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    };
    let sep = |at: usize, c: u8| b.get(at) == Some(&c);
    if !(sep(4, b'-') && sep(7, b'-') && (sep(10, b'T') || sep(10, b't')) && sep(13, b':') && sep(16, b':')) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut at = 19;
    let mut millis = 0i64;
    if sep(at, b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            at += 1;
        }
        if at == start {
            return None;
        }
        // Keep the first three fractional digits, padded: ".5" is 500 ms.
        for i in 0..3 {
            let digit = if start + i < at { i64::from(b[start + i] - b'0') } else { 0 };
            millis = millis * 10 + digit;
        }
    }
    let offset_secs = match b.get(at) {
        Some(b'Z' | b'z') if at + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if at + 6 == b.len() && sep(at + 3, b':') => {
            let (oh, om) = (num(at + 1, 2)?, num(at + 4, 2)?);
            let secs = oh * 3600 + om * 60;
            if sign == b'+' { secs } else { -secs }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    let ms = secs.checked_mul(1000)?.checked_add(millis)?;
    u64::try_from(ms).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_timestamps_become_unix_milliseconds() {
        assert_eq!(parse_docker_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_docker_time("2024-05-01T10:20:30.123456789Z"), Some(1_714_558_830_123));
        assert_eq!(parse_docker_time("2024-05-01T10:20:30.5Z"), Some(1_714_558_830_500));
        assert_eq!(parse_docker_time("2024-02-29T00:00:00Z"), Some(1_709_164_800_000));
        assert_eq!(parse_docker_time("2024-05-01T12:20:30+02:00"), Some(1_714_558_830_000));
        assert_eq!(parse_docker_time("2024-05-01T08:20:30-02:00"), Some(1_714_558_830_000));
    }

    #[test]
    fn the_zero_time_and_garbage_are_no_time() {
        assert_eq!(parse_docker_time("0001-01-01T00:00:00Z"), None);
        assert_eq!(parse_docker_time(""), None);
        assert_eq!(parse_docker_time("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_docker_time("2024-05-01 10:20:30Z"), None);
        assert_eq!(parse_docker_time("2024-05-01T10:20:30"), None);
        assert_eq!(parse_docker_time("2024-05-01T10:20:30.Z"), None);
        assert_eq!(parse_docker_time("2024-05-01T10:20:30Zjunk"), None);
        assert_eq!(parse_docker_time("２024-05-01T10:20:30Z"), None);
    }

    #[test]
    fn an_exited_container_reports_code_times_and_oom() {
        let state = EngineState {
            status: Some(Status::EXITED),
            exit_code: Some(137),
            oom_killed: Some(true),
            started_at: Some("1970-01-01T00:00:01Z".into()),
            finished_at: Some("1970-01-01T00:00:02.5Z".into()),
            ..Default::default()
        };
        assert_eq!(
            container_state(Some(&state)),
            ContainerState::Exited {
                exit_code: 137,
                started_unix_ms: Some(1000),
                finished_unix_ms: Some(2500),
                oom_killed: true
            }
        );
    }

    #[test]
    fn created_and_running_containers_map_to_their_states() {
        let created = EngineState {
            status: Some(Status::CREATED),
            started_at: Some("0001-01-01T00:00:00Z".into()),
            ..Default::default()
        };
        assert_eq!(container_state(Some(&created)), ContainerState::Created);
        let running = EngineState {
            status: Some(Status::RUNNING),
            running: Some(true),
            started_at: Some("1970-01-01T00:00:03Z".into()),
            ..Default::default()
        };
        assert_eq!(container_state(Some(&running)), ContainerState::Running { started_unix_ms: 3000 });
    }

    #[test]
    fn server_errors_are_retryable_and_refusals_are_not() {
        let err =
            |status_code| EngineError::DockerResponseServerError { status_code, message: "boom".into() };
        assert!(engine_error("start", err(500)).is_retryable());
        assert!(matches!(engine_error("start", err(400)), RuntimeError::Invalid(_)));
        assert!(engine_error("start", EngineError::RequestTimeoutError).is_retryable());
        assert!(engine_error("start", EngineError::SocketNotFoundError("/x".into())).is_retryable());
    }

    #[test]
    fn only_containerd_holding_the_id_counts_as_a_start_cut_short() {
        let answer = |status_code: u16, message: &str| EngineError::DockerResponseServerError {
            status_code,
            message: message.to_owned(),
        };
        assert!(start_cut_short(&answer(500, "id already in use")));
        assert!(!start_cut_short(&answer(
            500,
            "driver failed programming external connectivity on endpoint web: Error starting userland \
             proxy: listen tcp4 0.0.0.0:8080: bind: address already in use"
        )));
        assert!(!start_cut_short(&answer(409, "id already in use")));
        assert!(!start_cut_short(&answer(500, "something else")));
    }
}
