// SPDX-License-Identifier: MIT
#include <vramguard/clock.hpp>

#include <gtest/gtest.h>

#include <vector>

using namespace vramguard;
using namespace std::chrono_literals;

namespace {

TEST(ManualClock, MovesOnlyWhenToldAndRunsActionsInTimeOrder) {
    ManualClock clock;
    const TimePoint start = clock.now();
    std::vector<int> order;
    clock.after(3s, [&] { order.push_back(3); });
    clock.after(1s, [&] {
        order.push_back(1);
        EXPECT_EQ(clock.now(), start + 1s);  // an action sees its own time
    });
    clock.advance(500ms);
    EXPECT_TRUE(order.empty());
    clock.sleep(3s);
    EXPECT_EQ(order, (std::vector<int>{1, 3}));
    EXPECT_EQ(clock.now(), start + 3500ms);
    EXPECT_EQ(clock.slept(), 3500ms);
    clock.advance(-1s);  // time never runs backwards
    EXPECT_EQ(clock.now(), start + 3500ms);
}

TEST(ManualClock, AnActionMayScheduleAnother) {
    ManualClock clock;
    int fired = 0;
    clock.after(1s, [&] {
        ++fired;
        clock.after(1s, [&] { ++fired; });
    });
    clock.advance(5s);
    EXPECT_EQ(fired, 2);
}

TEST(PollUntil, ChecksFirstPollsAtTheIntervalAndNeverSleepsPastTheDeadline) {
    ManualClock clock;
    int checks = 0;
    const bool ok =
        detail::poll_until(clock.clock_fn(), clock.sleep_fn(), 250ms, clock.now() + 1s, [&] {
            ++checks;
            return false;
        });
    EXPECT_FALSE(ok);
    EXPECT_EQ(checks, 5);  // t = 0, .25, .5, .75, 1.0
    EXPECT_EQ(clock.slept(), 1s);

    ManualClock ready;
    EXPECT_TRUE(detail::poll_until(ready.clock_fn(), ready.sleep_fn(), 250ms, ready.now(),
                                   [] { return true; }));
    EXPECT_EQ(ready.slept(), 0s);

    ManualClock odd;
    detail::poll_until(odd.clock_fn(), odd.sleep_fn(), 300ms, odd.now() + 1s, [] { return false; });
    EXPECT_EQ(odd.slept(), 1s);  // .3 .6 .9 then .1 to the deadline
}

}  // namespace
