"""The C text of the closed-loop program that ``compressm_rl.control_loop`` builds: an
exported ``policy_step`` (``policy.c``) driving MuJoCo's own C library on a real-time
schedule, with a Gymnasium v5 task's observation, reward and termination written in C.

The source is the same for every task and export: the task's settings and the episodes'
initial states come in a binary file whose layout ``INPUT_HEADER`` / ``INPUT_PARAMS`` and
``OUTPUT_HEADER`` name (``control_loop.write_input`` / ``read_output`` write and read it).
"""

from __future__ import annotations

# Task kinds, as the C program numbers them.
TASK_KINDS = {
    "InvertedPendulum-v5": 0,
    "Hopper-v5": 1,
    "Walker2d-v5": 2,
    "HalfCheetah-v5": 3,
    "Swimmer-v5": 4,
    "Ant-v5": 5,
    "Humanoid-v5": 6,
}
# The MjData arrays a task may append to its observation, as bits of the header's
# `extra_obs`, in the order Gymnasium appends them (the rows each leaves out are
# envs.locomotion's _EXTRA_ROWS, written into the C below).
EXTRA_OBS = {"cinert": 1, "cvel": 2, "qfrc_actuator": 4, "cfrc_ext": 8}

INPUT_MAGIC = 0x434D4C4F4F500003  # "CMLOOP" + layout version 3
OUTPUT_MAGIC = 0x434D4C4F4F500101

# int64 fields at the start of the input file, in order.
INPUT_HEADER = (
    "magic",
    "kind",
    "nq",
    "nv",
    "nu",
    "na",
    "frame_skip",
    "max_episode_steps",
    "episodes",
    "obs_dim",  # the policy's observation: entries `keep` of the task's observation
    "skip_qpos",  # the task's observation leaves out qpos[0:skip_qpos]
    "extra_obs",  # EXTRA_OBS bits: MjData arrays after qpos and qvel
    "main_body",  # Ant: the body whose x position gives the forward velocity
    "clip_velocity",  # qvel clipped into [-velocity_clip, velocity_clip] in the observation
    "terminate_when_unhealthy",
    "state_range_size",  # 0, or nq - 2 + nv: Hopper's healthy_state_range, per element
    "realtime",  # try mlockall and SCHED_FIFO
    "fifo_priority",
)
# float64 fields after it, in order.
INPUT_PARAMS = (
    "timestep",  # model.opt.timestep, s
    "rate_hz",  # 0: as fast as possible
    "spin_us",  # the last this many µs before a release are busy-waited, not slept
    "forward_weight",
    "ctrl_weight",  # used as float32, as Gymnasium's `w * float32 sum` under NumPy 2
    "healthy_reward",
    "z_low",
    "z_high",
    "angle_low",
    "angle_high",
    "pendulum_angle_limit",  # InvertedPendulum: terminated when |qpos[1]| exceeds it
    "velocity_clip",
    "contact_weight",  # Ant, Humanoid
    "contact_low",  # Ant: each force clipped into [low, high]; Humanoid: the cost
    "contact_high",
)
# int64 fields at the start of the output file, in order.
OUTPUT_HEADER = (
    "magic",
    "episodes",
    "steps",
    "deadline_misses",
    "nonfinite_steps",
    "mujoco_warnings",
    "obs_mismatches",  # episode starts whose observation is not the one Python's reset gave
    "period_ns",
)

LOOP_SOURCE = r"""/* Closed-loop control of a MuJoCo task by an exported policy (policy.c), in real time.
 *
 * Usage: loop MODEL.xml INPUT.bin OUTPUT.bin
 *
 * Inputs. MODEL.xml: the task's MJCF, the file Gymnasium's env loads. INPUT.bin (native
 * byte order): int64 header[18] and double params[15] (names: compressm_rl/control_loop_c.py
 * INPUT_HEADER / INPUT_PARAMS), then double state_low[R], state_high[R] (R =
 * state_range_size), int64 keep[obs_dim], and per episode, episode-major: double
 * qpos[nq], qvel[nv], act[na] (the state Gymnasium's reset(seed=S+k) leaves) and
 * obs[obs_dim] (the observation it returned, checked against the one formed here).
 *
 * Each episode: mj_resetData, qpos/qvel/act set, mj_forward (Gymnasium's reset), policy
 * state zeroed; then control steps until termination or max_episode_steps. A control step
 * forms the observation from qpos/qvel and the task's MjData arrays (float64, as
 * Gymnasium's v5 _get_obs, then the entries `keep`, cast to float32), calls policy_step,
 * writes the action to ctrl, runs mj_step frame_skip times (then mj_rnePostConstraint
 * where the task reads contact forces, as Gymnasium does), and computes the reward and
 * termination as the v5 task's step() does, in the same float operations and order: sums
 * in NumPy's pairwise order, the ctrl cost in float32 but Humanoid's (data.ctrl). With
 * rate_hz > 0 step i is released at t0 + i * period (CLOCK_MONOTONIC, absolute:
 * clock_nanosleep TIMER_ABSTIME, no drift; the last spin_us before it busy-waited) and
 * misses its deadline when its work ends
 * after t0 + (i + 1) * period. The reset between episodes is done after a terminal
 * step's work, in its slack, and is not part of any control step. With `realtime` set,
 * mlockall(MCL_CURRENT | MCL_FUTURE) and SCHED_FIFO at fifo_priority are tried before the
 * loop (each reported, applied or not) and SCHED_OTHER is restored after it.
 *
 * Non-finite handling: policy_step returns POLICY_NONFINITE_INPUT / _RESULT with its safe
 * outputs (policy.h); the loop applies that action, counts the step, and goes on. MuJoCo
 * warnings (e.g. its automatic reset of an unstable simulation, which Gymnasium's env
 * makes too) are counted, not printed.
 *
 * Outputs. stdout: lines "mlockall 1|0 TEXT", "sched_fifo 1|0 TEXT" (TEXT: "ok" or the
 * errno text), "mujoco VERSION" and "rusage MINFLT MAJFLT NVCSW NIVCSW" (page faults and
 * voluntary / involuntary context switches during the loop, getrusage). OUTPUT.bin:
 * int64 header[8] (OUTPUT_HEADER), double returns[episodes], int64 lengths[episodes],
 * then int64[steps] each of: policy_step time, control step time, wake-up latency
 * (start - release) and lateness (end - deadline), ns.
 * Exit status 0; 2 for bad input or a MuJoCo error, with a line on stderr.
 *
 * Build: with policy.c and libmujoco, without multiply-add fusion here
 * (-ffp-contract=off): the reward must round each operation as NumPy does.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>

#include <mujoco/mujoco.h>

#include "policy.h"

enum { PENDULUM = 0, HOPPER = 1, WALKER = 2, CHEETAH = 3, SWIMMER = 4, ANT = 5, HUMANOID = 6 };
enum { CINERT = 1, CVEL = 2, QFRC_ACTUATOR = 4, CFRC_EXT = 8 };
enum { HEADER_SIZE = 18, PARAMS_SIZE = 15, OUT_HEADER_SIZE = 8, MAX_OBS = 1024 };
static const int64_t INPUT_MAGIC = 0x434D4C4F4F500003LL;
static const int64_t OUTPUT_MAGIC = 0x434D4C4F4F500101LL;

typedef struct {
    int64_t magic, kind, nq, nv, nu, na, frame_skip, max_steps, episodes, obs_dim;
    int64_t skip_qpos, extra_obs, main_body, clip_velocity, terminate_when_unhealthy;
    int64_t state_range_size, realtime, fifo_priority;
} Header;

typedef struct {
    double timestep, rate_hz, spin_us, forward_weight, ctrl_weight, healthy_reward;
    double z_low, z_high, angle_low, angle_high, pendulum_angle_limit, velocity_clip;
    double contact_weight, contact_low, contact_high;
} Params;

typedef struct {
    Header h;
    Params p;
    float ctrl_weight;            /* Gymnasium: float32(w) * float32 sum of squares */
    double *state_low, *state_high;
    int64_t *keep;
    double *qpos0, *qvel0, *act0, *obs0; /* per episode, episode-major */
} Task;

typedef struct {
    double *returns;
    int64_t *lengths, *policy_ns, *control_ns, *wake_ns, *late_ns;
    int64_t steps, misses, nonfinite, obs_mismatches, period_ns;
} Record;

static int mujoco_warnings;

static void count_warning(const char *message)
{
    (void)message;
    ++mujoco_warnings; /* no output inside the loop */
}

static void mujoco_error(const char *message)
{
    fprintf(stderr, "error: MuJoCo: %s\n", message);
    exit(2);
}

static void fail(const char *what)
{
    fprintf(stderr, "error: %s\n", what);
    exit(2);
}

static void *read_array(FILE *f, size_t count, size_t size)
{
    void *p = calloc(count ? count : 1, size);
    if (p == NULL) fail("out of memory");
    if (count && fread(p, size, count, f) != count) fail("input file too short");
    return p;
}

static void read_task(const char *path, Task *t)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) fail("cannot open the input file");
    int64_t header[HEADER_SIZE];
    double params[PARAMS_SIZE];
    if (fread(header, sizeof header, 1, f) != 1 || fread(params, sizeof params, 1, f) != 1)
        fail("input file too short");
    memcpy(&t->h, header, sizeof t->h);
    memcpy(&t->p, params, sizeof t->p);
    if (t->h.magic != INPUT_MAGIC) fail("input file of another layout");
    const int64_t episodes = t->h.episodes, r = t->h.state_range_size;
    t->ctrl_weight = (float)t->p.ctrl_weight;
    t->state_low = read_array(f, (size_t)r, sizeof(double));
    t->state_high = read_array(f, (size_t)r, sizeof(double));
    t->keep = read_array(f, (size_t)t->h.obs_dim, sizeof(int64_t));
    t->qpos0 = malloc(sizeof(double) * (size_t)(episodes * t->h.nq + 1));
    t->qvel0 = malloc(sizeof(double) * (size_t)(episodes * t->h.nv + 1));
    t->act0 = malloc(sizeof(double) * (size_t)(episodes * t->h.na + 1));
    t->obs0 = malloc(sizeof(double) * (size_t)(episodes * t->h.obs_dim + 1));
    if (!t->qpos0 || !t->qvel0 || !t->act0 || !t->obs0) fail("out of memory");
    for (int64_t k = 0; k < episodes; ++k) {
        size_t nq = (size_t)t->h.nq, nv = (size_t)t->h.nv, na = (size_t)t->h.na;
        size_t no = (size_t)t->h.obs_dim;
        if (fread(t->qpos0 + k * t->h.nq, sizeof(double), nq, f) != nq ||
            fread(t->qvel0 + k * t->h.nv, sizeof(double), nv, f) != nv ||
            fread(t->act0 + k * t->h.na, sizeof(double), na, f) != na ||
            fread(t->obs0 + k * t->h.obs_dim, sizeof(double), no, f) != no)
            fail("input file too short");
    }
    fclose(f);
}

/* The length of the task's observation before `keep`: Gymnasium's v5 _get_obs. */
static int64_t observation_size(const Header *h, const mjModel *m)
{
    int64_t n = m->nq - h->skip_qpos + m->nv;
    if (h->extra_obs & CINERT) n += (m->nbody - 1) * 10;
    if (h->extra_obs & CVEL) n += (m->nbody - 1) * 6;
    if (h->extra_obs & QFRC_ACTUATOR) n += m->nv - 6;
    if (h->extra_obs & CFRC_EXT) n += (m->nbody - 1) * 6;
    return n;
}

/* The sizes the input, the model and policy.h each state must agree. */
static void check_sizes(const Task *t, const mjModel *m)
{
    const Header *h = &t->h;
    if (h->nq != m->nq || h->nv != m->nv || h->nu != m->nu || h->na != m->na)
        fail("the model's nq/nv/nu/na are not the task's");
    if (h->obs_dim != POLICY_OBS_DIM || h->nu != POLICY_ACTION_DIM)
        fail("policy.h's POLICY_OBS_DIM/POLICY_ACTION_DIM are not the task's");
    if (h->kind < PENDULUM || h->kind > HUMANOID || h->frame_skip < 1 || h->max_steps < 1 ||
        h->episodes < 1)
        fail("bad task kind, frame_skip, max_episode_steps or episodes");
    if (h->state_range_size != 0 && h->state_range_size != m->nq - 2 + m->nv)
        fail("healthy_state_range of the wrong size");
    if (h->skip_qpos < 0 || h->skip_qpos > m->nq || h->main_body < 0 || h->main_body >= m->nbody)
        fail("skip_qpos or main_body out of range");
    const int64_t full = observation_size(h, m);
    if (full > MAX_OBS) fail("observation too large");
    for (int64_t j = 0; j < h->obs_dim; ++j)
        if (t->keep[j] < 0 || t->keep[j] >= full) fail("observation index out of range");
}

/* np.clip(x, low, high): NaN stays NaN. */
static double clip(double x, double low, double high)
{
    return x < low ? low : (x > high ? high : x);
}

/* Appends rows `first`.. of a row-major MjData array of `rows` x `width` to obs[n..]. */
static int64_t append_rows(double *obs, int64_t n, const mjtNum *array, int64_t rows,
                           int64_t width, int64_t first)
{
    for (int64_t i = first * width; i < rows * width; ++i) obs[n++] = array[i];
    return n;
}

/* Gymnasium's v5 _get_obs: [qpos[skip_qpos:], qvel (clipped on Hopper/Walker2d), then
 * the task's MjData arrays (Ant's contact forces clipped)], float64. */
static void observe(const Task *t, const mjModel *m, const mjData *d, double *obs)
{
    int64_t n = 0;
    for (int64_t i = t->h.skip_qpos; i < t->h.nq; ++i) obs[n++] = d->qpos[i];
    const double c = t->p.velocity_clip;
    for (int64_t i = 0; i < t->h.nv; ++i) {
        const double v = d->qvel[i];
        obs[n++] = t->h.clip_velocity ? clip(v, -c, c) : v;
    }
    const int64_t extra = t->h.extra_obs;
    if (extra & CINERT) n = append_rows(obs, n, d->cinert, m->nbody, 10, 1);
    if (extra & CVEL) n = append_rows(obs, n, d->cvel, m->nbody, 6, 1);
    if (extra & QFRC_ACTUATOR) n = append_rows(obs, n, d->qfrc_actuator, m->nv, 1, 6);
    if (extra & CFRC_EXT) {
        const int clipped = t->h.kind == ANT;
        for (int64_t i = 6; i < m->nbody * 6; ++i)
            obs[n++] = clipped ? clip(d->cfrc_ext[i], t->p.contact_low, t->p.contact_high)
                               : d->cfrc_ext[i];
    }
}

/* The policy's observation: entries `keep` of the task's, float32 (NumPy's cast). */
static void policy_input(const Task *t, const double *full, float *obs)
{
    for (int64_t j = 0; j < t->h.obs_dim; ++j) obs[j] = (float)full[t->keep[j]];
}

static int all_finite(const double *x, int64_t n)
{
    for (int64_t i = 0; i < n; ++i)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* NumPy's sum of a contiguous float64 array (pairwise_sum: eight accumulators below
 * 128 elements, halves above), so that a sum rounds as np.sum's does. */
static double np_sum(const double *a, int64_t n)
{
    if (n < 8) {
        double s = 0.0;
        for (int64_t i = 0; i < n; ++i) s += a[i];
        return s;
    }
    if (n <= 128) {
        double r[8];
        for (int j = 0; j < 8; ++j) r[j] = a[j];
        int64_t i = 8;
        for (; i < n - n % 8; i += 8)
            for (int j = 0; j < 8; ++j) r[j] += a[i + j];
        double s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; ++i) s += a[i];
        return s;
    }
    int64_t half = n / 2;
    half -= half % 8;
    return np_sum(a, half) + np_sum(a + half, n - half);
}

/* The same for float32 (NumPy adds float32 in float32). */
static float np_sum_f32(const float *a, int64_t n)
{
    if (n < 8) {
        float s = 0.0f;
        for (int64_t i = 0; i < n; ++i) s += a[i];
        return s;
    }
    if (n <= 128) {
        float r[8];
        for (int j = 0; j < 8; ++j) r[j] = a[j];
        int64_t i = 8;
        for (; i < n - n % 8; i += 8)
            for (int j = 0; j < 8; ++j) r[j] += a[i + j];
        float s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; ++i) s += a[i];
        return s;
    }
    int64_t half = n / 2;
    half -= half % 8;
    return np_sum_f32(a, half) + np_sum_f32(a + half, n - half);
}

/* The x position whose change over a step is the forward velocity: qpos[0]; Ant's main
 * body; Humanoid's mass centre (gymnasium's mass_center: np.sum(mass * xipos, axis=0),
 * row after row, over np.sum(mass), pairwise). */
static double forward_position(const Task *t, const mjModel *m, const mjData *d)
{
    if (t->h.kind == ANT) return d->xpos[3 * t->h.main_body];
    if (t->h.kind != HUMANOID) return d->qpos[0];
    double moment = 0.0;
    for (int64_t i = 0; i < m->nbody; ++i) moment += m->body_mass[i] * d->xipos[3 * i];
    return moment / np_sum(m->body_mass, m->nbody);
}

/* Each task's is_healthy: Hopper's and Walker2d's height, angle (and Hopper's state)
 * ranges; Ant's finite state and inclusive height range; Humanoid's height range.
 * Strict comparisons elsewhere: NaN is unhealthy. */
static int is_healthy(const Task *t, const mjData *d)
{
    if (t->h.kind == ANT) {
        const double z = d->qpos[2];
        return all_finite(d->qpos, t->h.nq) && all_finite(d->qvel, t->h.nv) &&
               t->p.z_low <= z && z <= t->p.z_high;
    }
    if (t->h.kind == HUMANOID) return t->p.z_low < d->qpos[2] && d->qpos[2] < t->p.z_high;
    const double z = d->qpos[1], angle = d->qpos[2];
    int healthy = t->p.z_low < z && z < t->p.z_high;
    healthy = healthy && t->p.angle_low < angle && angle < t->p.angle_high;
    const int64_t nq = t->h.nq;
    for (int64_t i = 0; i < t->h.state_range_size; ++i) { /* state_vector()[2:] */
        const double s = i < nq - 2 ? d->qpos[2 + i] : d->qvel[i - (nq - 2)];
        healthy = healthy && t->state_low[i] < s && s < t->state_high[i];
    }
    return healthy;
}

/* Ant's w * sum(clip(cfrc_ext)^2), Humanoid's clip(w * sum(cfrc_ext^2)), over every
 * body's row (the world's included), as np.sum of the [nbody, 6] array. */
static double contact_cost(const Task *t, const mjModel *m, const mjData *d, double *squares)
{
    const int64_t n = m->nbody * 6;
    for (int64_t i = 0; i < n; ++i) {
        const double f = t->h.kind == ANT
                             ? clip(d->cfrc_ext[i], t->p.contact_low, t->p.contact_high)
                             : d->cfrc_ext[i];
        squares[i] = f * f;
    }
    const double cost = t->p.contact_weight * np_sum(squares, n);
    return t->h.kind == HUMANOID ? clip(cost, t->p.contact_low, t->p.contact_high) : cost;
}

/* The reward of the step just taken (the v5 step's arithmetic) and its termination.
 * `scratch` holds max(nu, nbody * 6) doubles. */
static double reward(const Task *t, const mjModel *m, const mjData *d, const float *action,
                     double x_before, double *scratch, int *terminated)
{
    if (t->h.kind == PENDULUM) {
        const int finite = all_finite(d->qpos, m->nq) && all_finite(d->qvel, m->nv);
        *terminated = !finite || fabs(d->qpos[1]) > t->p.pendulum_angle_limit;
        return *terminated ? 0.0 : 1.0; /* int(not terminated) */
    }
    const double dt = m->opt.timestep * (double)t->h.frame_skip; /* MujocoEnv.dt */
    const double x_velocity = (forward_position(t, m, d) - x_before) / dt;
    const double forward = t->p.forward_weight * x_velocity;
    double ctrl_cost;
    if (t->h.kind == HUMANOID) { /* w * np.sum(np.square(data.ctrl)), float64 */
        for (int64_t i = 0; i < t->h.nu; ++i) scratch[i] = d->ctrl[i] * d->ctrl[i];
        ctrl_cost = t->p.ctrl_weight * np_sum(scratch, t->h.nu);
    } else { /* float32(w) * np.sum(np.square(action)), float32 */
        float squares[POLICY_ACTION_DIM];
        for (int64_t i = 0; i < t->h.nu; ++i) squares[i] = action[i] * action[i];
        ctrl_cost = (double)(t->ctrl_weight * np_sum_f32(squares, t->h.nu));
    }
    if (t->h.kind == CHEETAH || t->h.kind == SWIMMER) {
        *terminated = 0;
        return forward - ctrl_cost;
    }
    const int healthy = is_healthy(t, d);
    *terminated = !healthy && t->h.terminate_when_unhealthy;
    const double rewards = forward + (healthy ? 1.0 : 0.0) * t->p.healthy_reward;
    if (t->h.kind == ANT || t->h.kind == HUMANOID)
        return rewards - (ctrl_cost + contact_cost(t, m, d, scratch));
    return rewards - ctrl_cost;
}

/* Gymnasium's reset for episode k: mj_resetData, set_state(qpos, qvel), mj_forward.
 * Returns whether the observation formed now is the one Python's reset returned. */
static int reset_episode(const Task *t, const mjModel *m, mjData *d, int64_t k, double *full)
{
    mj_resetData(m, d);
    memcpy(d->qpos, t->qpos0 + k * t->h.nq, sizeof(double) * (size_t)t->h.nq);
    memcpy(d->qvel, t->qvel0 + k * t->h.nv, sizeof(double) * (size_t)t->h.nv);
    if (t->h.na) memcpy(d->act, t->act0 + k * t->h.na, sizeof(double) * (size_t)t->h.na);
    mj_forward(m, d);
    observe(t, m, d, full);
    const double *expected = t->obs0 + k * t->h.obs_dim;
    for (int64_t j = 0; j < t->h.obs_dim; ++j)
        if (memcmp(&full[t->keep[j]], &expected[j], sizeof(double)) != 0) return 0;
    return 1;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Sleeps until spin_ns before `release`, then busy-waits for it: a core that stays awake
 * is not handed to another vCPU or task in the last stretch, so the step starts on time. */
static void wait_until(int64_t release, int64_t spin_ns)
{
    const int64_t wake = release - spin_ns;
    struct timespec ts;
    ts.tv_sec = (time_t)(wake / 1000000000LL);
    ts.tv_nsec = (long)(wake % 1000000000LL);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
    while (now_ns() < release) {
    }
}

/* Touches 256 KiB of stack so that its pages are mapped (and locked) before the loop. */
static void prefault_stack(void)
{
    volatile unsigned char buffer[256 * 1024];
    for (size_t i = 0; i < sizeof buffer; i += 4096) buffer[i] = 0;
}

/* mlockall and SCHED_FIFO where permitted; each reported on stdout as applied or not. */
static void go_realtime(const Task *t)
{
    if (!t->h.realtime) {
        printf("mlockall 0 not requested\nsched_fifo 0 not requested\n");
        return;
    }
    if (mlockall(MCL_CURRENT | MCL_FUTURE) == 0)
        printf("mlockall 1 ok\n");
    else
        printf("mlockall 0 %s\n", strerror(errno));
    prefault_stack();
    struct sched_param param;
    memset(&param, 0, sizeof param);
    param.sched_priority = (int)t->h.fifo_priority;
    if (sched_setscheduler(0, SCHED_FIFO, &param) == 0)
        printf("sched_fifo 1 ok\n");
    else
        printf("sched_fifo 0 %s\n", strerror(errno));
    fflush(stdout);
}

static void leave_realtime(void)
{
    struct sched_param param;
    memset(&param, 0, sizeof param);
    sched_setscheduler(0, SCHED_OTHER, &param); /* fails harmlessly if never FIFO */
}

static void *alloc_zeroed(size_t count, size_t size)
{
    void *p = calloc(count ? count : 1, size);
    if (p == NULL) fail("out of memory");
    return p;
}

static void alloc_record(const Task *t, Record *r)
{
    const size_t steps = (size_t)(t->h.episodes * t->h.max_steps);
    memset(r, 0, sizeof *r);
    r->returns = alloc_zeroed((size_t)t->h.episodes, sizeof(double));
    r->lengths = alloc_zeroed((size_t)t->h.episodes, sizeof(int64_t));
    r->policy_ns = alloc_zeroed(steps, sizeof(int64_t));
    r->control_ns = alloc_zeroed(steps, sizeof(int64_t));
    r->wake_ns = alloc_zeroed(steps, sizeof(int64_t));
    r->late_ns = alloc_zeroed(steps, sizeof(int64_t));
    /* write every page now: calloc may hand out untouched zero pages */
    for (size_t i = 0; i < steps; ++i)
        r->policy_ns[i] = r->control_ns[i] = r->wake_ns[i] = r->late_ns[i] = 0;
}

/* All episodes; per-step times into r. */
static void run(const Task *t, const mjModel *m, mjData *d, Record *r)
{
    double full[MAX_OBS];
    double *scratch = alloc_zeroed((size_t)(m->nu > m->nbody * 6 ? m->nu : m->nbody * 6),
                                   sizeof(double));
    const int contacts = t->h.kind == ANT || t->h.kind == HUMANOID;
    float obs[POLICY_OBS_DIM], action[POLICY_ACTION_DIM];
    float state[POLICY_STATE_DIM + 1];
    const int64_t period = t->p.rate_hz > 0 ? llround(1e9 / t->p.rate_hz) : 0;
    const int64_t spin_ns = llround(t->p.spin_us * 1e3);
    r->period_ns = period;
    int64_t release = now_ns() + period;
    for (int64_t k = 0; k < t->h.episodes; ++k) {
        r->obs_mismatches += !reset_episode(t, m, d, k, full);
        memset(state, 0, sizeof state);
        int terminated = 0;
        for (int64_t step = 0; step < t->h.max_steps && !terminated; ++step) {
            if (period) wait_until(release, spin_ns);
            const int64_t start = now_ns();
            observe(t, m, d, full);
            policy_input(t, full, obs);
            const int64_t policy_start = now_ns();
            const int status = policy_step(obs, state, action, state);
            const int64_t policy_end = now_ns();
            const double x_before = forward_position(t, m, d);
            for (int64_t i = 0; i < t->h.nu; ++i) d->ctrl[i] = (double)action[i];
            for (int64_t i = 0; i < t->h.frame_skip; ++i) mj_step(m, d);
            if (contacts) mj_rnePostConstraint(m, d); /* cfrc_ext, as Gymnasium's step */
            r->returns[k] += reward(t, m, d, action, x_before, scratch, &terminated);
            const int64_t end = now_ns();
            const int64_t n = r->steps++;
            r->policy_ns[n] = policy_end - policy_start;
            r->control_ns[n] = end - start;
            r->nonfinite += status != POLICY_OK;
            if (period) {
                r->wake_ns[n] = start - release;
                r->late_ns[n] = end - (release + period);
                r->misses += r->late_ns[n] > 0;
                release += period;
            }
            ++r->lengths[k];
        }
    }
    free(scratch);
}

static void write_record(const char *path, const Task *t, const Record *r)
{
    FILE *f = fopen(path, "wb");
    if (f == NULL) fail("cannot open the output file");
    const int64_t header[OUT_HEADER_SIZE] = {
        OUTPUT_MAGIC, t->h.episodes,     r->steps,          r->misses,
        r->nonfinite, mujoco_warnings,   r->obs_mismatches, r->period_ns};
    const size_t e = (size_t)t->h.episodes, n = (size_t)r->steps;
    int ok = fwrite(header, sizeof header, 1, f) == 1;
    ok = ok && fwrite(r->returns, sizeof(double), e, f) == e;
    ok = ok && fwrite(r->lengths, sizeof(int64_t), e, f) == e;
    ok = ok && fwrite(r->policy_ns, sizeof(int64_t), n, f) == n;
    ok = ok && fwrite(r->control_ns, sizeof(int64_t), n, f) == n;
    ok = ok && fwrite(r->wake_ns, sizeof(int64_t), n, f) == n;
    ok = ok && fwrite(r->late_ns, sizeof(int64_t), n, f) == n;
    if (fclose(f) != 0 || !ok) fail("cannot write the output file");
}

int main(int argc, char **argv)
{
    if (argc != 4) fail("usage: loop MODEL.xml INPUT.bin OUTPUT.bin");
    if (mj_version() != mjVERSION_HEADER) fail("libmujoco is not the version of its headers");
    mju_user_warning = count_warning;
    mju_user_error = mujoco_error;
    Task t;
    read_task(argv[2], &t);
    char error[1000] = "";
    mjModel *m = mj_loadXML(argv[1], NULL, error, sizeof error);
    if (m == NULL) mujoco_error(error);
    mujoco_warnings = 0; /* the compiler's (deprecated attributes) are not the loop's */
    m->opt.timestep = t.p.timestep; /* the env's, should it differ from the file's */
    mjData *d = mj_makeData(m);
    if (d == NULL) fail("mj_makeData failed");
    check_sizes(&t, m);
    Record r;
    alloc_record(&t, &r);
    printf("mujoco %s\n", mj_versionString());
    go_realtime(&t);
    struct rusage before, after;
    getrusage(RUSAGE_SELF, &before);
    run(&t, m, d, &r);
    getrusage(RUSAGE_SELF, &after);
    leave_realtime();
    printf("rusage %ld %ld %ld %ld\n", after.ru_minflt - before.ru_minflt,
           after.ru_majflt - before.ru_majflt, after.ru_nvcsw - before.ru_nvcsw,
           after.ru_nivcsw - before.ru_nivcsw);
    write_record(argv[3], &t, &r);
    mj_deleteData(d);
    mj_deleteModel(m);
    return 0;
}
"""
