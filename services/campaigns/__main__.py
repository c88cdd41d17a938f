from chassis.service import main
from services.campaigns.server import definition

main(definition)
