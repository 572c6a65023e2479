//! Blanket impls: a backend lent by reference (or shared in an `Arc`,
//! boxed) is a backend too.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::model::{PageRun, ProgramState, RegionLayout, RegionPages, SocketPrep, SocketRecord};
use crate::protocol::{Message, PageBatch};

use super::{
    Channel, DirtyClearer, DirtyTracker, MemorySink, MemorySource, PageResidency, SocketSink,
    SocketSource, StateSink, StateSource,
};

macro_rules! forward_mut {
    ($trait:ident { $( fn $name:ident(&mut self $(, $arg:ident : $ty:ty)*) -> $ret:ty; )* }) => {
        impl<T: $trait + ?Sized> $trait for &mut T {
            $( fn $name(&mut self $(, $arg: $ty)*) -> $ret { (**self).$name($($arg),*) } )*
        }
    };
}

impl<T: SocketSource + ?Sized> SocketSource for &mut T {
    fn moved_addresses(&self) -> Vec<std::net::IpAddr> {
        (**self).moved_addresses()
    }
    fn plan(&mut self) -> Result<Vec<SocketPrep>> {
        (**self).plan()
    }
    fn freeze(&mut self) -> Result<()> {
        (**self).freeze()
    }
    fn capture(&mut self, emit: &mut dyn FnMut(Vec<SocketRecord>) -> Result<()>) -> Result<()> {
        (**self).capture(emit)
    }
    fn queued_bytes(&mut self) -> Result<u64> {
        (**self).queued_bytes()
    }
    fn abort(&mut self) -> Result<()> {
        (**self).abort()
    }
    fn release(&mut self) -> Result<()> {
        (**self).release()
    }
}

forward_mut!(SocketSink {
    fn prepare(&mut self, plan: &[SocketPrep]) -> Result<()>;
    fn restore(&mut self, batch: Vec<SocketRecord>) -> Result<()>;
    fn activate(&mut self) -> Result<()>;
    fn discard(&mut self) -> ();
});

forward_mut!(StateSource {
    fn pause(&mut self) -> Result<()>;
    fn capture(&mut self) -> Result<ProgramState>;
    fn resume(&mut self) -> Result<()>;
    fn throttle(&mut self, percent: u8) -> bool;
    fn committed(&mut self) -> ();
});

forward_mut!(StateSink {
    fn restore(&mut self, state: ProgramState) -> Result<()>;
    fn resume(&mut self) -> Result<()>;
    fn discard(&mut self) -> ();
});

impl<T: DirtyTracker + ?Sized> DirtyTracker for &mut T {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn start(&mut self) -> Result<()> {
        (**self).start()
    }
    fn collect(&mut self, dirty: &mut RegionPages) -> Result<()> {
        (**self).collect(dirty)
    }
    fn collect_paused(&mut self, dirty: &mut RegionPages) -> Result<()> {
        (**self).collect_paused(dirty)
    }
    fn stop(&mut self) -> Result<()> {
        (**self).stop()
    }
    fn clearer(&self) -> Option<Box<dyn DirtyClearer>> {
        (**self).clearer()
    }
}

macro_rules! forward_source {
    ($ty:ty) => {
        impl<T: MemorySource + ?Sized> MemorySource for $ty {
            fn layout(&self) -> RegionLayout {
                (**self).layout()
            }
            fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> Result<()> {
                (**self).read_pages(run, dst)
            }
            fn find_zero_pages(&self, run: &PageRun, zero: &mut [bool]) -> Result<bool> {
                (**self).find_zero_pages(run, zero)
            }
            fn populated(&self, pages: &mut RegionPages) -> Result<bool> {
                (**self).populated(pages)
            }
            fn free_pages(&self, free: &mut RegionPages) -> Result<bool> {
                (**self).free_pages(free)
            }
            fn take_freed(&self, freed: &mut RegionPages) -> Result<()> {
                (**self).take_freed(freed)
            }
            fn release(&self) {
                (**self).release()
            }
            fn urgent_thread(&self) {
                (**self).urgent_thread()
            }
            fn background_thread(&self) {
                (**self).background_thread()
            }

            fn mark_handed_over(&self, confirmed: bool) {
                (**self).mark_handed_over(confirmed)
            }
            fn handed_over(&self) -> Option<bool> {
                (**self).handed_over()
            }
        }
    };
}
forward_source!(&T);
forward_source!(Arc<T>);

macro_rules! forward_sink {
    ($ty:ty) => {
        impl<T: MemorySink + ?Sized> MemorySink for $ty {
            fn prepare(&self, layout: &RegionLayout) -> Result<()> {
                (**self).prepare(layout)
            }
            fn write_pages(&self, run: &PageRun, data: &[u8]) -> Result<()> {
                (**self).write_pages(run, data)
            }
            fn zero_pages(&self, run: &PageRun) -> Result<()> {
                (**self).zero_pages(run)
            }
            fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> Result<()> {
                (**self).read_pages(run, dst)
            }
            fn begin_postcopy(&self, missing: &RegionPages) -> Result<()> {
                (**self).begin_postcopy(missing)
            }
            fn wait_fault(&self, timeout: Duration) -> Result<Option<PageRun>> {
                (**self).wait_fault(timeout)
            }
            fn hold_missing(&self) -> Result<()> {
                (**self).hold_missing()
            }
            fn end_postcopy(&self) -> Result<()> {
                (**self).end_postcopy()
            }
            fn discard(&self) {
                (**self).discard()
            }
            fn residency(&self) -> Option<Arc<dyn PageResidency>> {
                (**self).residency()
            }
            fn urgent_thread(&self) {
                (**self).urgent_thread()
            }
            fn background_thread(&self) {
                (**self).background_thread()
            }
            fn waits_fault_or(&self) -> bool {
                (**self).waits_fault_or()
            }
            fn wait_fault_or(
                &self,
                also: Option<RawFd>,
                timeout: Duration,
            ) -> Result<Option<PageRun>> {
                (**self).wait_fault_or(also, timeout)
            }
            fn fault_wait_spins(&self) -> bool {
                (**self).fault_wait_spins()
            }
            fn take_faults(&self, runs: &mut Vec<PageRun>, max: usize) -> Result<usize> {
                (**self).take_faults(runs, max)
            }
        }
    };
}
forward_sink!(&T);
forward_sink!(Arc<T>);

macro_rules! forward_channel {
    ($ty:ty) => {
        impl<T: Channel + ?Sized> Channel for $ty {
            fn send(&self, msg: &Message) -> Result<()> {
                (**self).send(msg)
            }
            fn send_pages(&self, lane: usize, batch: &PageBatch) -> Result<()> {
                (**self).send_pages(lane, batch)
            }
            fn send_urgent(&self, msg: &Message) -> Result<()> {
                (**self).send_urgent(msg)
            }
            fn send_urgent_many(&self, msgs: &[Message]) -> Result<()> {
                (**self).send_urgent_many(msgs)
            }
            fn send_lane(&self, lane: usize, msg: &Message) -> Result<()> {
                (**self).send_lane(lane, msg)
            }
            fn data_lanes(&self) -> usize {
                (**self).data_lanes()
            }
            fn ip_addresses(&self) -> Vec<std::net::IpAddr> {
                (**self).ip_addresses()
            }
            fn flush(&self) -> Result<()> {
                (**self).flush()
            }
            fn warm_receive(&self, bytes: u64) {
                (**self).warm_receive(bytes)
            }
            fn recv(&self, timeout: Option<Duration>) -> Result<Option<Message>> {
                (**self).recv(timeout)
            }
            fn recv_urgent(&self, timeout: Duration) -> Result<Option<Message>> {
                (**self).recv_urgent(timeout)
            }
            fn reconnect(&self) -> Result<()> {
                (**self).reconnect()
            }
            fn shutdown(&self) {
                (**self).shutdown()
            }
            fn urgent_fd(&self) -> Result<Option<RawFd>> {
                (**self).urgent_fd()
            }
        }
    };
}
forward_channel!(&T);
forward_channel!(Arc<T>);
forward_channel!(Box<T>);
