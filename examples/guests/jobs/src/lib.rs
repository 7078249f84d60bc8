//! A job queue with visibility timeouts, delayed jobs and dead letters: a waft guest that
//! acts on time (`waft:fsm@0.2.0` timers) and tells its watchers what happened (events).
//!
//! Commands (JSON):
//! - `{"Enqueue": {"id": "j1", "body": "...", "delay_ms": 0}}`: a new job, ready now or after
//!   `delay_ms` (a timer makes it ready).
//! - `{"Take": {"worker": "w1", "visibility_ms": 30000}}`: the oldest ready job, invisible to
//!   other workers for `visibility_ms`; if the worker neither acknowledges nor extends it by
//!   then, a timer puts it back in the queue (after `max_attempts` takes it goes to the dead
//!   letters instead). Replies `null` when nothing is ready.
//! - `{"Ack": {"id": "j1", "worker": "w1"}}`: done; the job is removed.
//! - `{"Extend": {"id": "j1", "worker": "w1", "visibility_ms": 30000}}`: more time.
//! - `{"Release": {"id": "j1", "worker": "w1"}}`: give it back now.
//!
//! Queries: `"Stats"`, `{"Job": "j1"}`, `"Dead"`.
//!
//! Events (topic, data = the job id): `jobs/enqueued`, `jobs/ready` (a delayed job became
//! ready), `jobs/taken`, `jobs/done`, `jobs/expired` (back in the queue), `jobs/dead`.
//! Watch them with `waft watch --events jobs/`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use waft_guest::json::{Json, JsonStateMachine};
use waft_guest::{Context, events, timers};

/// Takes before a job goes to the dead letters.
const MAX_ATTEMPTS: u32 = 5;

/// The queue.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Jobs {
    /// Every job not yet done, by id.
    jobs: BTreeMap<String, Job>,
    /// Ready jobs in queue order: position → id.
    ready: BTreeMap<u64, String>,
    /// The next queue position.
    next_position: u64,
    /// Jobs taken `MAX_ATTEMPTS` times without an acknowledgement, by id.
    dead: BTreeMap<String, Job>,
}

/// One job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// What the worker gets.
    pub body: String,
    /// Where it is.
    pub state: JobState,
    /// How many times it was taken.
    pub attempts: u32,
}

/// Where a job is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// In the queue, at this position.
    Ready { position: u64 },
    /// Waiting until this time (then ready).
    Delayed { until_ms: u64 },
    /// Taken by a worker, invisible until this time.
    Taken { worker: String, until_ms: u64 },
}

/// A command.
#[derive(Debug, Deserialize)]
pub enum Command {
    /// Adds a job.
    Enqueue {
        id: String,
        body: String,
        #[serde(default)]
        delay_ms: u64,
    },
    /// Takes the oldest ready job.
    Take { worker: String, visibility_ms: u64 },
    /// Finishes a job.
    Ack { id: String, worker: String },
    /// Gives the worker more time.
    Extend {
        id: String,
        worker: String,
        visibility_ms: u64,
    },
    /// Puts a taken job back now.
    Release { id: String, worker: String },
}

/// A query.
#[derive(Debug, Deserialize)]
pub enum Query {
    /// Counts.
    Stats,
    /// One job.
    Job(String),
    /// The dead letters' ids.
    Dead,
}

/// A job handed to a worker.
#[derive(Debug, Serialize)]
pub struct Taken {
    /// Its id.
    pub id: String,
    /// Its body.
    pub body: String,
    /// Which take this is (1 for the first).
    pub attempt: u32,
    /// When it becomes visible again unless acknowledged or extended.
    pub until_ms: u64,
}

/// What a command answers.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// A job given to a worker (or none ready).
    Taken(Option<Taken>),
    /// When the job becomes visible or ready again (enqueue with a delay, extend).
    Until(u64),
    /// Done.
    Done,
}

/// What a query answers.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum QueryReply {
    /// Counts by state.
    Stats {
        ready: usize,
        delayed: usize,
        taken: usize,
        dead: usize,
    },
    /// A job.
    Job(Job),
    /// Dead letters.
    Dead(Vec<String>),
}

fn visibility_timer(id: &str) -> String {
    format!("visible/{id}")
}

fn delay_timer(id: &str) -> String {
    format!("delay/{id}")
}

impl Jobs {
    fn make_ready(&mut self, id: &str) {
        let position = self.next_position;
        self.next_position += 1;
        self.ready.insert(position, id.to_owned());
        if let Some(job) = self.jobs.get_mut(id) {
            job.state = JobState::Ready { position };
        }
    }

    /// The job `id`, taken by `worker`, or why not.
    fn taken_by(&self, id: &str, worker: &str) -> Result<&Job, String> {
        let job = self.jobs.get(id).ok_or_else(|| format!("no job {id:?}"))?;
        match &job.state {
            JobState::Taken { worker: w, .. } if w == worker => Ok(job),
            JobState::Taken { worker: w, .. } => {
                Err(format!("job {id:?} is taken by {w:?}, not {worker:?}"))
            }
            _ => Err(format!("job {id:?} is not taken")),
        }
    }
}

impl JsonStateMachine for Jobs {
    type Command = Command;
    type Reply = Reply;
    type Query = Query;
    type QueryReply = QueryReply;

    fn apply(&mut self, ctx: &Context, command: Command) -> Result<Reply, String> {
        let now = ctx.timestamp_ms;
        match command {
            Command::Enqueue { id, body, delay_ms } => {
                if id.is_empty() || id.len() > 200 {
                    return Err("a job id has 1 to 200 bytes".into());
                }
                if self.jobs.contains_key(&id) || self.dead.contains_key(&id) {
                    return Err(format!("job {id:?} exists"));
                }
                let state = if delay_ms == 0 {
                    JobState::Ready { position: 0 }
                } else {
                    JobState::Delayed {
                        until_ms: now.saturating_add(delay_ms),
                    }
                };
                self.jobs.insert(
                    id.clone(),
                    Job {
                        body,
                        state,
                        attempts: 0,
                    },
                );
                events::emit("jobs/enqueued", id.as_bytes());
                if delay_ms == 0 {
                    self.make_ready(&id);
                    Ok(Reply::Until(now))
                } else {
                    timers::set_after(ctx, &delay_timer(&id), delay_ms, b"");
                    Ok(Reply::Until(now.saturating_add(delay_ms)))
                }
            }
            Command::Take {
                worker,
                visibility_ms,
            } => {
                if visibility_ms == 0 {
                    return Err("visibility_ms must be positive".into());
                }
                let Some((_, id)) = self.ready.pop_first() else {
                    return Ok(Reply::Taken(None));
                };
                let until_ms = now.saturating_add(visibility_ms);
                let job = self.jobs.get_mut(&id).expect("a ready job exists");
                job.attempts += 1;
                job.state = JobState::Taken {
                    worker: worker.clone(),
                    until_ms,
                };
                timers::set(&visibility_timer(&id), until_ms, b"");
                events::emit("jobs/taken", id.as_bytes());
                Ok(Reply::Taken(Some(Taken {
                    body: job.body.clone(),
                    attempt: job.attempts,
                    id,
                    until_ms,
                })))
            }
            Command::Ack { id, worker } => {
                self.taken_by(&id, &worker)?;
                self.jobs.remove(&id);
                timers::cancel(&visibility_timer(&id));
                events::emit("jobs/done", id.as_bytes());
                Ok(Reply::Done)
            }
            Command::Extend {
                id,
                worker,
                visibility_ms,
            } => {
                self.taken_by(&id, &worker)?;
                let until_ms = now.saturating_add(visibility_ms);
                let job = self.jobs.get_mut(&id).expect("checked above");
                job.state = JobState::Taken { worker, until_ms };
                timers::set(&visibility_timer(&id), until_ms, b"");
                Ok(Reply::Until(until_ms))
            }
            Command::Release { id, worker } => {
                self.taken_by(&id, &worker)?;
                timers::cancel(&visibility_timer(&id));
                self.make_ready(&id);
                events::emit("jobs/expired", id.as_bytes());
                Ok(Reply::Done)
            }
        }
    }

    fn fire(&mut self, _ctx: &Context, key: &str, _payload: &[u8]) -> Result<(), String> {
        if let Some(id) = key.strip_prefix("delay/") {
            match self.jobs.get(id).map(|j| &j.state) {
                Some(JobState::Delayed { .. }) => {
                    self.make_ready(id);
                    events::emit("jobs/ready", id.as_bytes());
                    Ok(())
                }
                _ => Err(format!("timer {key:?}: job {id:?} is not delayed")),
            }
        } else if let Some(id) = key.strip_prefix("visible/") {
            let job = match self.jobs.get(id) {
                Some(
                    j @ Job {
                        state: JobState::Taken { .. },
                        ..
                    },
                ) => j.clone(),
                _ => return Err(format!("timer {key:?}: job {id:?} is not taken")),
            };
            if job.attempts >= MAX_ATTEMPTS {
                self.jobs.remove(id);
                self.dead.insert(id.to_owned(), job);
                events::emit("jobs/dead", id.as_bytes());
            } else {
                self.make_ready(id);
                events::emit("jobs/expired", id.as_bytes());
            }
            Ok(())
        } else {
            Err(format!("unknown timer {key:?}"))
        }
    }

    fn query(&self, query: Query) -> Result<QueryReply, String> {
        match query {
            Query::Stats => {
                let (mut delayed, mut taken) = (0, 0);
                for job in self.jobs.values() {
                    match job.state {
                        JobState::Delayed { .. } => delayed += 1,
                        JobState::Taken { .. } => taken += 1,
                        JobState::Ready { .. } => {}
                    }
                }
                Ok(QueryReply::Stats {
                    ready: self.ready.len(),
                    delayed,
                    taken,
                    dead: self.dead.len(),
                })
            }
            Query::Job(id) => self
                .jobs
                .get(&id)
                .or_else(|| self.dead.get(&id))
                .cloned()
                .map(QueryReply::Job)
                .ok_or_else(|| format!("no job {id:?}")),
            Query::Dead => Ok(QueryReply::Dead(self.dead.keys().cloned().collect())),
        }
    }
}

waft_guest::export!(Json<Jobs>);
