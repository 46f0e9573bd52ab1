# The root configuration driven the way a user drives it: defaults first, then more hosts.
# mock_provider: no AWS account and no network; computed values are invented by Terraform.

mock_provider "aws" {
  source = "./tests/mocks"
}

variables {
  admin_cidrs    = ["203.0.113.7/32"]
  ssh_public_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJq7eXAMPLEkEyFoRtEsTsOnLy test@example"
}

run "defaults_give_one_g5_xlarge_in_a_two_az_network" {
  assert {
    condition     = length(output.hosts) == 1 && output.hosts[0].instance_type == "g5.xlarge"
    error_message = "the defaults must create exactly one g5.xlarge host"
  }
  assert {
    condition     = module.network.availability_zones == ["us-east-1a", "us-east-1b"]
    error_message = "the network must span the first two zones that offer the instance type"
  }
  assert {
    condition     = length(module.network.public_subnet_ids) == 2
    error_message = "one public subnet per availability zone"
  }
  assert {
    condition     = output.load_balancer_dns_name == null
    error_message = "one host needs no load balancer"
  }
  assert {
    condition     = output.model_bucket_name == null && output.model_cache_url == null
    error_message = "the model bucket is opt-in"
  }
  assert {
    condition     = output.ssh_user == "ubuntu" && !output.api_tls_trusted && output.api_tls == "self-signed"
    error_message = "default image logs in as ubuntu; without a domain the certificate is self-signed"
  }
  assert {
    condition     = output.letsencrypt_domain == null && output.letsencrypt_email == null && module.gpu_host.letsencrypt_dns_policy == null
    error_message = "without a domain there is no Let's Encrypt and the host role has no Route53 permission"
  }
  assert {
    condition     = output.api_endpoint == "https://${output.hosts[0].public_dns}"
    error_message = "without a domain the endpoint is the host's public DNS name over HTTPS"
  }
  assert {
    condition     = output.instance_ids == [output.hosts[0].instance_id] && output.private_ips == [output.hosts[0].private_ip]
    error_message = "the flat outputs Ansible reads must match the host objects"
  }
}

run "three_hosts_get_a_load_balancer_and_a_dns_alias" {
  variables {
    host_count          = 3
    domain_name         = "api.example.com"
    route53_zone_id     = "Z0123456789ABCDEFGHIJ"
    create_model_bucket = true
  }

  assert {
    condition     = length(output.hosts) == 3 && length(output.instance_ids) == 3
    error_message = "host_count = 3 must create three hosts"
  }
  assert {
    condition     = length(module.load_balancer) == 1 && output.load_balancer_dns_name != null
    error_message = "more than one host must create the load balancer"
  }
  assert {
    condition     = output.api_endpoint == "https://api.example.com" && output.api_tls_trusted && output.api_tls == "acm"
    error_message = "with a domain the endpoint is the domain, with a trusted certificate"
  }
  assert {
    condition     = output.letsencrypt_domain == null && module.gpu_host.letsencrypt_dns_policy == null
    error_message = "behind a load balancer (ACM) the hosts get no Let's Encrypt and no Route53 permission"
  }
  assert {
    condition     = length(module.dns) == 1 && module.dns[0].fqdn != null
    error_message = "a Route53 zone must get the API record"
  }
  assert {
    condition     = output.model_bucket_name != null
    error_message = "create_model_bucket must create the bucket"
  }
  assert {
    condition     = output.model_cache_url == "s3://${output.model_bucket_name}/hf-cache"
    error_message = "the hosts' cache URL must be the created bucket, under the prefix the instance role may write"
  }
}

run "three_hosts_with_an_existing_certificate" {
  command = plan

  variables {
    host_count      = 3
    domain_name     = "api.example.com"
    certificate_arn = "arn:aws:acm:us-east-1:123456789012:certificate/0b1c2d3e-aaaa-bbbb-cccc-000000000000"
  }

  assert {
    condition     = length(module.load_balancer) == 1 && length(module.dns) == 0
    error_message = "an existing certificate without a zone: load balancer, no Route53 record"
  }
}

run "local_zones_are_never_picked" {
  command = plan

  # a Local Zone offering the type sorts before the region's own zones
  override_data {
    target = data.aws_ec2_instance_type_offerings.gpu
    values = { locations = ["us-east-1-bos-1a", "us-east-1b", "us-east-1-mia-1a", "us-east-1a"] }
  }
  override_data {
    target = data.aws_availability_zones.regular
    values = { names = ["us-east-1a", "us-east-1b", "us-east-1c"] }
  }

  assert {
    condition     = module.network.availability_zones == ["us-east-1a", "us-east-1b"]
    error_message = "the network must use the region's regular zones, never a Local Zone"
  }
  assert {
    condition = (
      contains(data.aws_availability_zones.regular.filter[*].name, "opt-in-status") &&
      contains(flatten(data.aws_availability_zones.regular.filter[*].values), "opt-in-not-required")
    )
    error_message = "the zone lookup must ask AWS for zones that need no opt-in"
  }
}


run "one_named_host_gets_lets_encrypt_by_dns_in_its_zone" {
  command = plan

  variables {
    domain_name       = "api.example.com"
    route53_zone_id   = "Z0123456789ABCDEFGHIJ"
    letsencrypt_email = "ops@example.com"
  }

  assert {
    condition     = length(module.load_balancer) == 0 && length(module.dns) == 1
    error_message = "one host: no load balancer, an A record for the name"
  }
  assert {
    condition     = output.api_endpoint == "https://api.example.com" && output.api_tls_trusted && output.api_tls == "letsencrypt"
    error_message = "one named host is trusted through Let's Encrypt"
  }
  assert {
    condition     = output.letsencrypt_domain == "api.example.com" && output.letsencrypt_email == "ops@example.com"
    error_message = "Ansible's nginx role must be told the name and the ACME contact"
  }
  assert {
    condition = one([
      for s in jsondecode(module.gpu_host.letsencrypt_dns_policy).Statement : s.Resource
      if s.Action == "route53:ChangeResourceRecordSets"
    ]) == "arn:aws:route53:::hostedzone/Z0123456789ABCDEFGHIJ"
    error_message = "the host role may change records in the deployment's zone only"
  }
}
