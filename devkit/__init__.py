"""Development tools of the project, not shipped in its images: the fault-injecting image server
(a stand-in for Flickr), the offline demo of the data stages, the local servers the tests
and the stack script start, and the native run of docker-compose.yaml's topology
(:mod:`devkit.topology`). ``python -m devkit --help`` lists its commands."""
