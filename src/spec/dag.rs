//! The step dependency graph: cycle detection at submission, and the
//! "what may run now" query tests ask of a spec (the engine's plan asks
//! it of steps and fan-out instances together).
//!
//! Steps are nodes named by their index in the spec; `deps(i)` lists the
//! steps `i` waits for. Everything here is O(steps + edges), so it stays cheap
//! at the 500-step limit even when called after each completion.

#[cfg(test)]
use std::collections::HashSet;

/// A dependency cycle, if any, as indices `[a, b, …, a]` where each step
/// depends on the next. It starts at its lowest index so the report is
/// stable. Kahn's algorithm: whatever cannot be peeled off from the
/// dependency-free end lies on or behind a cycle.
pub(crate) fn find_cycle<'a>(n: usize, deps: impl Fn(usize) -> &'a [usize]) -> Option<Vec<usize>> {
    let mut waiting: Vec<usize> = (0..n).map(|i| deps(i).len()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for i in 0..n {
        for &d in deps(i) {
            dependents[d].push(i);
        }
    }
    let mut queue: Vec<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
    while let Some(i) = queue.pop() {
        for &j in &dependents[i] {
            waiting[j] -= 1;
            if waiting[j] == 0 {
                queue.push(j);
            }
        }
    }
    let start = (0..n).find(|&i| waiting[i] > 0)?;

    // Every step left over still waits on another left-over step, so
    // following such a dependency from any of them must come back round.
    let mut path = vec![start];
    let mut seen_at = vec![usize::MAX; n];
    seen_at[start] = 0;
    let mut cur = start;
    let first_on_cycle = loop {
        let next = deps(cur).iter().copied().find(|&d| waiting[d] > 0)?;
        if seen_at[next] != usize::MAX {
            break seen_at[next];
        }
        seen_at[next] = path.len();
        path.push(next);
        cur = next;
    };
    let mut cycle = path.split_off(first_on_cycle);
    let lowest = (0..cycle.len()).min_by_key(|&k| cycle[k])?;
    cycle.rotate_left(lowest);
    cycle.push(cycle[0]);
    Some(cycle)
}

/// Steps not yet done or running whose dependencies are all done, in order.
#[cfg(test)]
pub(crate) fn ready<'a>(
    n: usize,
    deps: impl Fn(usize) -> &'a [usize],
    done: &HashSet<usize>,
    running: &HashSet<usize>,
) -> Vec<usize> {
    (0..n)
        .filter(|i| !done.contains(i) && !running.contains(i))
        .filter(|&i| deps(i).iter().all(|d| done.contains(d)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cycle(g: &[Vec<usize>]) -> Option<Vec<usize>> {
        find_cycle(g.len(), |i| &g[i])
    }

    fn ready_in(g: &[Vec<usize>], done: &[usize], running: &[usize]) -> Vec<usize> {
        ready(g.len(), |i| &g[i], &done.iter().copied().collect(), &running.iter().copied().collect())
    }

    #[test]
    fn acyclic_graphs_have_no_cycle() {
        assert_eq!(cycle(&[]), None);
        assert_eq!(cycle(&[vec![], vec![0], vec![1]]), None);
        assert_eq!(cycle(&[vec![], vec![0], vec![0], vec![1, 2]]), None);
    }

    #[test]
    fn finds_two_and_three_cycles() {
        assert_eq!(cycle(&[vec![1], vec![0]]), Some(vec![0, 1, 0]));
        // 0 -> 2 -> 1 -> 0, reported from the lowest index.
        assert_eq!(cycle(&[vec![2], vec![0], vec![1]]), Some(vec![0, 2, 1, 0]));
    }

    #[test]
    fn reports_the_cycle_not_the_steps_behind_it() {
        // 0 is fine; 1 waits on the 2<->3 cycle; 4 waits on 1.
        let g = [vec![], vec![0, 2], vec![3], vec![2], vec![1]];
        assert_eq!(cycle(&g), Some(vec![2, 3, 2]));
    }

    #[test]
    fn ready_on_a_chain() {
        let g = [vec![], vec![0], vec![1]];
        assert_eq!(ready_in(&g, &[], &[]), [0]);
        assert_eq!(ready_in(&g, &[], &[0]), Vec::<usize>::new());
        assert_eq!(ready_in(&g, &[0], &[]), [1]);
        assert_eq!(ready_in(&g, &[0, 1], &[]), [2]);
        assert_eq!(ready_in(&g, &[0, 1, 2], &[]), Vec::<usize>::new());
    }

    #[test]
    fn ready_on_a_diamond() {
        let g = [vec![], vec![0], vec![0], vec![1, 2]];
        assert_eq!(ready_in(&g, &[0], &[]), [1, 2]);
        assert_eq!(ready_in(&g, &[0], &[1]), [2]);
        assert_eq!(ready_in(&g, &[0, 1], &[2]), Vec::<usize>::new());
        assert_eq!(ready_in(&g, &[0, 1, 2], &[]), [3]);
    }
}
